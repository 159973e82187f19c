"""Meta-training and meta-testing loops.

:func:`meta_train` runs the outer loop of the paper (Adam on the flat initialisation theta,
lr 1e-3, a meta-batch of 5 tasks drawn from a fixed pool per step). It writes to ``out_dir``:

* ``checkpoint.pt``: theta, Adam's state, the step and the metrics so far, written atomically
  (a temporary file renamed over the old one) every ``checkpoint_every`` steps, at the end,
  and when the run is interrupted (Ctrl-C);
* ``metrics.csv``: one row per meta-step (mean query loss of the batch, meta-gradient norm,
  seconds), rewritten atomically with each checkpoint;
* ``theta.pt``: the learned initialisation (a flat tensor) when the run completes;
* ``config.json``: the run's settings, checked on resume.

The tasks of step ``s`` are drawn from a generator seeded by ``(seed, s)``, not from a running
random stream, so a resumed run draws the same tasks as an uninterrupted one; with Adam's state
restored exactly, ``resume`` reproduces the uninterrupted theta bit for bit (on the CPU).

:func:`meta_test` adapts from a learned initialisation on each test task with plain GD and
records the query nRMSE after every step (the curves of the paper's Fig. 2).
"""


from ..data.batch import task_indices
from .distributed import Distributed, DistributedError, init_distributed, launched_by_torchrun
from .evaluate import METRICS_FNS, Z95, accuracy, confidence_interval, half_width, meta_test, nrmse
from .io import (CHECKPOINT, CHECKPOINT_KEYS, CONFIG, METRIC_FIELDS, METRICS, OPTIONAL_METRIC_FIELDS, THETA,
                 RunConfigMismatch, RunFileError, UnreadableRunFile, atomic_write_bytes, load_checkpoint,
                 read_json_file, read_torch_file)
from .loop import Terminated, meta_train

__all__ = ["meta_train", "meta_test", "Distributed", "DistributedError", "init_distributed", "launched_by_torchrun", "task_indices", "nrmse", "accuracy", "METRICS_FNS", "confidence_interval",
           "half_width", "Z95", "load_checkpoint", "read_torch_file", "read_json_file", "atomic_write_bytes",
           "RunConfigMismatch", "RunFileError", "UnreadableRunFile", "Terminated", "CHECKPOINT", "CHECKPOINT_KEYS",
           "CONFIG", "METRICS", "METRIC_FIELDS", "OPTIONAL_METRIC_FIELDS", "THETA"]
