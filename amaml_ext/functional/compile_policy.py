"""When the model callbacks are compiled: what the running torch allows (:func:`compile_refusal`)
and where compiling pays (:func:`compile_pays`), which ``compile="auto"`` follows
(:func:`resolve_compile`, overridable for a process with ``$AMAML_EXT_COMPILE``)."""

import os
from typing import Optional

import torch
from torch import nn


def compile_refusal() -> Optional[str]:
    """Why ``compile=True`` is refused with the running torch, or None. torch 2.13's inductor
    dereferences the ``aten._efficientzerotensor`` that the compiled HVP of ``F.mse_loss``
    makes (the zero tangent of the target) and segfaults, which no fallback can catch."""
    major_minor = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if major_minor == (2, 13):
        return (f"torch {torch.__version__}'s inductor segfaults on the compiled HVP (zero tangents of "
                "the loss's target); compile=True needs torch >= 2.14 or <= 2.12")
    return None


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def compile_pays(model: nn.Module, device: torch.device) -> bool:
    """Where ``compile="auto"`` compiles: measured (docs/benchmarks.md) to pay for dense models on
    the CPU, where eager overhead dominates (2.4-3.5x per meta-gradient for the paper's MLPs), and
    not for convolutional nets on the CPU, whose time is in the convolutions. Not measured on a
    GPU: eager there until it is."""
    return device.type == "cpu" and not any(isinstance(m, _CONV) for m in model.modules())


COMPILE_ENV = "AMAML_EXT_COMPILE"
"""Environment variable deciding ``compile="auto"`` for a whole process: ``auto`` (default),
``on`` or ``off``."""


def compile_env() -> str:
    """``$AMAML_EXT_COMPILE`` as ``"auto"``, ``"on"`` or ``"off"``; ValueError naming it for any
    other value. :func:`resolve_compile` reads it only when a callback is built; a command checks
    it up front with this."""
    mode = os.environ.get(COMPILE_ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"environment variable {COMPILE_ENV} must be auto, on or off, got {mode!r}")
    return mode


def resolve_compile(compile, model: nn.Module, device: torch.device) -> bool:
    """``compile`` (True, False or ``"auto"``) as a bool. ``"auto"`` follows ``$AMAML_EXT_COMPILE``
    (``on``/``off``), else :func:`compile_pays`; it is off, without a warning, where the running
    torch cannot compile safely."""
    if compile != "auto":
        return bool(compile)
    mode = compile_env()
    if mode == "off" or compile_refusal() is not None:
        return False
    return mode == "on" or compile_pays(model, device)
