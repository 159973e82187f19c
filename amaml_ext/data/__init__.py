"""Task sources: the batch and pool protocol (:mod:`.batch`), the synthetic regression families
(:mod:`.synthetic`), the rating datasets (:mod:`.ratings`, pandas) and the few-shot image datasets
(:mod:`.images`, Pillow). ``ratings`` and ``images`` are imported on first use. This layer knows
no model: the benchmark registry that wires each source to its model, loss and metric is
:mod:`amaml_ext.train.benchmarks`."""

from .batch import TaskBatch, TaskPool, task_indices, task_seed
from .files import DataFileError
from .synthetic import FAMILIES, SETTINGS, Alpine, CosMixture, TaskFamily, make_family, train_test_pools

__all__ = ["TaskBatch", "TaskPool", "task_indices", "task_seed", "TaskFamily", "CosMixture", "Alpine", "FAMILIES",
           "SETTINGS", "make_family", "train_test_pools", "DataFileError"]
