"""`python -m stepfusion_kernels.train_meta metafusion-TASK [flags]`: the Meta Fusion tasks' command line
(see stepfusion_kernels.tasks.meta_fusion)."""

import sys

from .tasks.meta_fusion import main

if __name__ == "__main__":
    main(sys.argv[1:])
