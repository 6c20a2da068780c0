"""Third-party notices nobody can act on are silenced once per process, for every launch path."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import warnings
from pipeline.train.distributed import quiet_third_party
quiet_third_party()
warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated.", FutureWarning)
warnings.warn("a warning that must still show", UserWarning)
import deepspeed  # notes the accelerator it picked unless it was named
from deepspeed.accelerator import get_accelerator
print(get_accelerator().device_name())
"""


def test_deprecation_and_accelerator_notices_are_silenced_in_a_fresh_process():
    env = {"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "is deprecated" not in out.stderr
    assert "must still show" in out.stderr
    assert "Setting accelerator to CPU" not in out.stdout + out.stderr
