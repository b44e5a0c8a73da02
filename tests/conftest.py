import os
import sys

import torch

# Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter. The variable must be
# set before triton is first imported (by stepfusion_kernels' Triton modules).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests import their shared harness as a module of this folder.
sys.path.insert(0, os.path.dirname(__file__))
