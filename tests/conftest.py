import os
import sys

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter. The variable must be
# set before triton is first imported (by stepfusion_kernels' Triton modules).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests import their shared harness as a module of this folder.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def chunked_rows(monkeypatch):
    """Every row goes to the Triton kernels that loop over a row in chunks (otherwise those of rows wider
    than FUSED_MAX), in chunks of 16, so that small inputs span several chunks and end in a partial one."""
    from stepfusion_kernels.triton import _common

    monkeypatch.setattr(_common, "FUSED_MAX", 0)
    monkeypatch.setattr(_common, "CHUNK", 16)
