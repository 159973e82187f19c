"""A run directory's files: names, atomic writes, and reading them back with errors that name the
file and leave it as it is."""

import csv
import io
import json
import os
from typing import Dict, List, Optional

import torch

from .._io import atomic_write_bytes, torch_bytes

__all__ = ["CHECKPOINT", "METRICS", "THETA", "CONFIG", "METRIC_FIELDS", "OPTIONAL_METRIC_FIELDS", "CHECKPOINT_KEYS",
           "RunConfigMismatch", "RunFileError", "UnreadableRunFile", "atomic_write_bytes", "torch_bytes",
           "csv_bytes", "read_torch_file", "read_json_file", "load_checkpoint"]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"
THETA = "theta.pt"
CONFIG = "config.json"
METRIC_FIELDS = ["step", "query_loss", "grad_norm", "seconds"]
OPTIONAL_METRIC_FIELDS = ["adjoint_error_estimate", "h_lambda_max"]
"""Written to metrics.csv when the learner reports them (A-MAML with a continuous adjoint)."""


class RunConfigMismatch(ValueError):
    """``resume`` found a run directory made with other settings."""


def csv_bytes(rows: List[Dict]) -> bytes:
    buf = io.StringIO()
    extra = [k for k in OPTIONAL_METRIC_FIELDS if any(k in r for r in rows)]
    fields = METRIC_FIELDS[:-1] + extra + METRIC_FIELDS[-1:]   # "seconds" stays last
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in fields})
    return buf.getvalue().encode()


class RunFileError(ValueError):
    """The run directory cannot be written, or one of its files read."""


class UnreadableRunFile(RunFileError):
    """A run file (checkpoint.pt, config.json, theta.pt) that cannot be read; it is left as it is."""


CHECKPOINT_KEYS = ("theta", "optimizer", "step", "metrics")


def read_torch_file(path: str, what: str):
    """``torch.load`` of a run file, or UnreadableRunFile naming it (touching nothing)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (truncated, empty, garbage: all unreadable)
        raise UnreadableRunFile(f"{path} ({what}) is unreadable: {type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200] if str(e) else ''}. It was left as it is; "
                                f"move it away to start afresh") from None


def read_json_file(path: str, what: str) -> Dict:
    """``json.load`` of a run file (an object), or UnreadableRunFile naming it."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise UnreadableRunFile(f"{path} ({what}) is unreadable: {type(e).__name__}: {e}. It was left as it "
                                f"is") from None
    if not isinstance(obj, dict):
        raise UnreadableRunFile(f"{path} ({what}) is unreadable: expected a JSON object, got "
                                f"{type(obj).__name__}. It was left as it is")
    return obj


def load_checkpoint(out_dir: str) -> Optional[Dict]:
    """The run's checkpoint (None if there is none); UnreadableRunFile if it is damaged or lacks
    keys."""
    path = os.path.join(out_dir, CHECKPOINT)
    if not os.path.exists(path):
        return None
    ck = read_torch_file(path, "checkpoint")
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise UnreadableRunFile(f"{path} (checkpoint) is unreadable: it lacks {missing}. It was left as it is")
    return ck

