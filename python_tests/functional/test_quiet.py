"""Quiet and correct: a run that compiles prints no warning about torch's own internals."""

import os
import subprocess
import sys

import pytest

from helpers import ROOT

_CODE = """
import warnings, torch
warnings.simplefilter("error", FutureWarning)
from amaml_ext.functional import TaskFunctions
net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
x, y = torch.randn(4, 2), torch.randn(4, 1)
TaskFunctions(net, torch.nn.functional.mse_loss, (x, y), (x, y), compile=True)
from torch.autograd import forward_ad
with forward_ad.dual_level():          # forward-mode AD, as the compiled HVP's jvp uses it
    forward_ad.make_dual(torch.zeros(1), torch.ones(1))
print("quiet")
"""


@pytest.mark.slow
def test_compiled_callbacks_do_not_surface_torchs_jit_script_deprecation():
    """torch registers its forward-mode decompositions with torch.jit.script, which warns it is
    deprecated (a FutureWarning in every compiled run); the compiled callbacks load them with
    that one warning silenced. Fresh interpreter: the registration happens once per process."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _CODE], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0 and "quiet" in out.stdout, out.stderr[-2000:]
