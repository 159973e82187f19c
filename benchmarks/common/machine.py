"""The software and hardware a result belongs to, recorded in every benchmark's JSON."""

import os
import platform
import subprocess
from typing import Dict

import torch

from .children import REPO


def git_commit() -> str:
    """The short commit of the checkout, or "" outside git."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=REPO).stdout.strip()
    except OSError:
        return ""


def machine_info(device="cpu") -> Dict:
    """torch, Python, platform, CPUs, torch threads, load, commit, the amaml_ext build and the
    torchdiffeq version; the GPU's name and memory when ``device`` is a CUDA device."""
    info = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "machine": platform.machine(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "loadavg_1m": round(os.getloadavg()[0], 2),
            "git": git_commit(), "device": str(device), "cuda_available": torch.cuda.is_available()}
    try:
        import amaml_ext
        info["amaml_ext"] = amaml_ext.build_info()
    except Exception as exc:  # noqa: BLE001  (informational only)
        info["amaml_ext"] = f"unavailable: {exc}"
    try:
        import torchdiffeq
        info["torchdiffeq"] = torchdiffeq.__version__
    except ImportError:
        info["torchdiffeq"] = None
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info
