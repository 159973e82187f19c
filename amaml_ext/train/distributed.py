"""Meta-training and meta-testing across processes on ``torch.distributed`` (launched by
``torchrun``, or by the user's own ``init_process_group``); docs/design.md, "Distributed
meta-training".

Each meta-step's tasks (those of the single-process run, :func:`task_indices`) are split over
the ranks contiguously; every rank computes the meta-gradient of its tasks **one task at a time**
(or in fixed groups of ``tasks_per_call``), the per-task ``[grad, query loss, stats]`` rows are
all-gathered (padded when the split is uneven), and every rank sums them in task order and
divides by the meta-batch. Every task's row is thus computed the same way whatever the split,
and the sum runs in one fixed order: float64 runs end at the same theta bit for bit for any
world size. Every rank holds theta and Adam's
state and takes the same step; rank 0 alone writes files.
"""

import os
import signal
import threading
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Optional, Tuple, Union

import torch
import torch.distributed as dist

from ..metagrad.accuracy import AdjointAccuracyError
from ..data.batch import TaskBatch
from ..learners import MetaLearner, MetaStep

__all__ = ["Distributed", "DistributedError", "init_distributed", "launched_by_torchrun", "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = 600.0
"""Seconds a collective waits for the other ranks before it fails (``AMAML_DIST_TIMEOUT``)."""

_STATS = ("adjoint_error_estimate", "h_lambda_max")   # per-task stats kept (their max over the batch)
_FAILED, _FAILED_ACCURACY = 1.0, 2.0


class DistributedError(RuntimeError):
    """A collective failed (another rank died or did not answer within the timeout), or another
    rank's meta-gradient raised. The message names the collective and the rank.

    Example:
        >>> from amaml_ext import train
        >>> issubclass(train.DistributedError, RuntimeError)    # every rank raises it alike, none hangs
        True
    """


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (its environment names a rank and a rendezvous:
    ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``).

    Example:
        >>> import os
        >>> launched_by_torchrun() == all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
        True
    """
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def _timeout_seconds(timeout: Optional[float]) -> float:
    t = float(os.environ.get("AMAML_DIST_TIMEOUT", DEFAULT_TIMEOUT)) if timeout is None else float(timeout)
    if not t > 0:
        raise ValueError(f"argument 'timeout' must be a positive number of seconds, got {timeout!r}")
    return t


def init_distributed(device: Union[str, torch.device] = "cpu", backend: Optional[str] = None,
                     timeout: Optional[float] = None, tasks_per_call: int = 1) -> "Distributed":
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); a no-op if it is already initialised.

    ``backend``: default gloo on the CPU, nccl for ``device`` cuda (which becomes
    ``cuda:LOCAL_RANK``). ``timeout``: seconds a collective waits for the others (default
    ``AMAML_DIST_TIMEOUT`` or 600): a rank that died makes the others fail instead of hanging.
    ``tasks_per_call``: see :class:`Distributed`.

    Returns:
        Distributed: the default group.

    Raises:
        RuntimeError: no process group is initialised and torchrun's variables are not set.
        ValueError: a non-positive ``timeout`` or ``tasks_per_call``.

    Example:
        >>> import os
        >>> from amaml_ext import train
        >>> if not train.launched_by_torchrun():
        ...     train.init_distributed()
        Traceback (most recent call last):
        ...
        RuntimeError: init_distributed: RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT are not set; ...
    """
    seconds = _timeout_seconds(timeout)
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        if not launched_by_torchrun():
            raise RuntimeError("init_distributed: RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT are not set; launch "
                               "with 'torchrun --nproc-per-node N ...' or call torch.distributed.init_process_group")
        dist.init_process_group(backend or ("nccl" if dev.type == "cuda" else "gloo"),
                                timeout=timedelta(seconds=seconds))
    return Distributed(timeout=seconds, device=dev, tasks_per_call=tasks_per_call)


class Distributed:
    """The default process group as this package uses it: the split of a meta-batch, the gather
    of per-task rows in task order, the agreement on a stop, rank 0's broadcasts.

    ``tasks_per_call``: the meta-batch is cut into fixed groups of this many tasks (the last may
    be smaller), each group one (vmapped) ``meta_grad`` call; the groups, not the tasks, are
    split over the ranks. The result depends on it (by rounding) but not on the world size: 1
    (the default) parallelises best; more amortises the per-call cost of small models.

    Args:
        timeout: seconds a collective waits (default ``AMAML_DIST_TIMEOUT`` or 600).
        device: where the collectives' tensors live (nccl: this rank's GPU).
        tasks_per_call: see above.

    Raises:
        RuntimeError: no process group is initialised.
        ValueError: a bad ``tasks_per_call`` or ``timeout``.

    Example:
        >>> import torch.distributed as dist
        >>> from amaml_ext import train
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)   # one process
        >>> group = train.Distributed()
        >>> group.rank, group.world, group.is_main, group.span(10)
        (0, 1, True, (0, 10))
        >>> dist.destroy_process_group()
    """

    def __init__(self, timeout: Optional[float] = None, device: Optional[torch.device] = None,
                 tasks_per_call: int = 1):
        if isinstance(tasks_per_call, bool) or not isinstance(tasks_per_call, int) or tasks_per_call < 1:
            raise ValueError(f"argument 'tasks_per_call' must be a positive int, got {tasks_per_call!r}")
        self.tasks_per_call = tasks_per_call
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("distributed=True needs an initialised process group: launch with torchrun, or call "
                               "amaml_ext.train.init_distributed() (or torch.distributed.init_process_group) first")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.timeout = _timeout_seconds(timeout)
        nccl = dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        if nccl and device is not None and torch.device(device).type == "cuda":
            self.device = torch.device(device)

    @classmethod
    def resolve(cls, distributed) -> Optional["Distributed"]:
        """``meta_train``'s ``distributed`` argument: None/False -> None; True -> the default group
        (initialised from torchrun's environment if need be); a Distributed -> itself."""
        if distributed is None or distributed is False:
            return None
        if isinstance(distributed, Distributed):
            return distributed
        if distributed is True:
            return cls() if dist.is_initialized() else init_distributed()
        raise TypeError(f"argument 'distributed' must be None, a bool or a Distributed, got {type(distributed).__name__}")

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the one that writes files)."""
        return self.rank == 0

    def span(self, n: int, rank: Optional[int] = None) -> Tuple[int, int]:
        """The contiguous slice ``[a, b)`` of ``n`` items of ``rank`` (the first ``n % world`` ranks one more)."""
        r = self.rank if rank is None else rank
        q, extra = divmod(n, self.world)
        a = r * q + min(r, extra)
        return a, a + q + (1 if r < extra else 0)

    @contextmanager
    def _collective(self, what: str):
        try:
            yield
        except Exception as e:  # noqa: BLE001  (gloo/nccl raise RuntimeError or DistBackendError)
            msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            raise DistributedError(f"rank {self.rank} of {self.world}: {what} failed: another rank stopped or did not "
                                   f"answer within {self.timeout:g} s ({msg})") from None

    def gather_rows(self, local: torch.Tensor, n: int, what: str = "the gather of per-task results") -> torch.Tensor:
        """All ranks' rows ``[n_r, m]`` (rank r's share of ``n`` by :meth:`span`) as ``[n, m]`` in task order."""
        m = -(-n // self.world)
        padded = torch.zeros((m,) + tuple(local.shape[1:]), dtype=local.dtype, device=self.device)
        padded[:local.shape[0]] = local.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        with self._collective(what):
            dist.all_gather(parts, padded)
        counts = [self.span(n, r)[1] - self.span(n, r)[0] for r in range(self.world)]
        return torch.cat([p[:c] for c, p in zip(counts, parts)])

    def agree_max(self, value: float, what: str = "the agreement on a stop") -> float:
        """The largest ``value`` over the ranks (every rank gets it)."""
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        with self._collective(what):
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def broadcast_(self, tensor: torch.Tensor, what: str = "the broadcast of theta") -> None:
        """Rank 0's ``tensor`` into every rank's, in place."""
        buf = tensor.detach().to(self.device).clone()
        with self._collective(what):
            dist.broadcast(buf, 0)
        with torch.no_grad():
            tensor.copy_(buf.to(tensor.device))

    def on_main(self, fn: Callable[[], Any], what: str = "rank 0's answer") -> Any:
        """``fn()`` on rank 0, its result (or the exception it raised) on every rank."""
        box = [None]
        if self.is_main:
            try:
                box[0] = (True, fn())
            except Exception as e:  # noqa: BLE001  (raised on every rank below)
                box[0] = (False, e)
        with self._collective(what):
            dist.broadcast_object_list(box, 0, device=self.device if self.device.type == "cuda" else None)
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def barrier(self, what: str = "the barrier") -> None:
        """Wait for every rank (:class:`DistributedError`, naming ``what``, if one fails)."""
        with self._collective(what):
            dist.barrier()

    def meta_grad(self, learner: MetaLearner, theta: torch.Tensor, tasks: TaskBatch) -> MetaStep:
        """The meta-batch's mean meta-gradient, the same on every rank and for every world size:
        this rank's groups of ``tasks_per_call`` tasks one call each, their rows gathered, the
        gradients summed in group order, divided by the batch."""
        B, n, c = tasks.size, theta.numel(), self.tasks_per_call
        groups = -(-B // c)
        a, b = self.span(groups)
        rows = torch.full((b - a, n + 1 + len(_STATS)), float("nan"), dtype=theta.dtype, device=self.device)
        losses = torch.full((b - a, c), float("nan"), dtype=theta.dtype, device=self.device)
        error = None
        for j in range(a, b):
            size = min(c, B - j * c)
            try:
                out = learner.meta_grad(theta, tasks.select(slice(j * c, j * c + size)))
            except Exception as e:  # noqa: BLE001  (every rank learns of it through the gather, then raises)
                error, rows[j - a:, -1] = e, (_FAILED_ACCURACY if isinstance(e, AdjointAccuracyError) else _FAILED)
                break
            rows[j - a, :n] = out.grad.reshape(-1) * size      # the group's sum (exact for one task)
            losses[j - a, :size] = out.query_loss.reshape(-1)
            for k, name in enumerate(_STATS):
                if out.stats.get(name) is not None:
                    rows[j - a, n + k] = float(out.stats[name])
            rows[j - a, -1] = 0.0
        full = self.gather_rows(torch.cat([rows, losses], 1), groups)
        self._raise_failures(full[:, n + len(_STATS)], error, groups)
        grad = full[0, :n].clone()
        for j in range(1, groups):          # the fixed-order sum: the same for every split
            grad += full[j, :n]
        stats = {}
        for k, name in enumerate(_STATS):
            col = full[:, n + k]
            if not bool(col.isnan().all()):
                stats[name] = float(col[~col.isnan()].max())
        loss = full[:, -c:].reshape(-1)[:B]
        return MetaStep((grad / B).to(theta.device), loss.to(theta.device), stats)

    def _raise_failures(self, status: torch.Tensor, error: Optional[BaseException], groups: int) -> None:
        failed = status > 0
        if not bool(failed.any()):
            return
        if error is not None:
            raise error
        first = int(failed.nonzero()[0])
        kind = AdjointAccuracyError if float(status[first]) == _FAILED_ACCURACY else DistributedError
        raise kind(f"the meta-gradient of task group {first} of the meta-batch failed on rank "
                   f"{self._rank_of(first, groups)}; see that rank's error")

    def _rank_of(self, i: int, n: int) -> int:
        return next(r for r in range(self.world) if self.span(n, r)[0] <= i < self.span(n, r)[1])


class StopFlags:
    """In distributed mode SIGINT and SIGTERM only set a flag (a rank must not leave in the middle
    of a collective); the ranks agree on it at each step boundary (:meth:`Distributed.agree_max`).
    torchrun forwards a signal to every rank; a rank that gets none still stops with the others."""

    CODES = {signal.SIGINT: 1.0, signal.SIGTERM: 2.0}

    def __init__(self):
        self.code = 0.0
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.CODES:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame):
        self.code = max(self.code, self.CODES[signum])

    def __exit__(self, *exc):
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        return False
