import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU the Triton kernels run only in Triton's CPU interpreter, which must be chosen before
# Triton is first imported; a plain `pytest` on a CPU machine then tests them as the README's command does.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tiny grids of these tests are smaller than most patterns' windows, so their plans keep every
# pair, and by default (SparseConfig.dense_when_full) such layers run the model's own attention:
# the mirrored processors and the kernels would then go untested. The suite runs them; the tests
# of the default itself (test_dense_when_full.py) turn it back on.
os.environ["VIDSPARSE_DENSE_WHEN_FULL"] = "0"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
