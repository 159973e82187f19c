"""The outer loop: Adam on theta over meta-batches of a pool, with checkpoints, resume and a clean
stop on Ctrl-C / SIGTERM (see :mod:`amaml_ext.train`)."""

import json
import math
import os
import signal
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional

import torch

from .. import _checks
from ..metagrad.accuracy import AdjointAccuracyError
from ..data.batch import TaskPool, task_indices
from ..functional import flatten_params
from ..learners import MetaLearner
from .distributed import Distributed, DistributedError, StopFlags
from .io import (CHECKPOINT, CONFIG, METRICS, OPTIONAL_METRIC_FIELDS, THETA, RunFileError, UnreadableRunFile,
                 atomic_write_bytes, check_resumable, csv_bytes, load_checkpoint, lock_run_dir, torch_bytes,
                 unlock_run_dir)


RESUME_HINT = "run again with resume=True to continue"
"""How an interrupted :func:`meta_train` says to continue (the command says it its own way)."""


def meta_train(learner: MetaLearner, pool: TaskPool, *, meta_steps: int, out_dir: Optional[str] = None,
               theta0: Optional[torch.Tensor] = None,
               meta_batch: int = 5, lr: float = 1e-3, seed: int = 0, resume: bool = False,
               checkpoint_every: int = 50, device="cpu", dtype=torch.float32, config: Optional[Dict] = None,
               progress: bool = True, on_step: Optional[Callable[[int, Dict], None]] = None,
               checkpoint_seconds: Optional[float] = 600.0, distributed=None,
               clip_grad_norm: Optional[float] = None) -> torch.Tensor:
    """Meta-train ``learner`` on ``pool`` for ``meta_steps`` Adam steps; returns the learned theta.

    Args:
        learner: a :class:`amaml_ext.learners.MetaLearner`.
        pool: the meta-training tasks (a pool with a ``draw(index, step=, seed=, device=,
            dtype=)`` method, like a resampling ``RatingPool``, is asked for each step's data
            through it; otherwise ``pool.batch(index)``).
        meta_steps: total number of outer steps (a resumed run continues up to it).
        out_dir: run directory (created); see the module doc for its files. None: no files are
            kept (a temporary directory holds the checkpoints during the run; nothing to resume).
            It is locked during the call: one that another process is using is refused
            (:class:`~amaml_ext.train.io.RunLocked`, naming it).
        theta0: initial meta-parameters ``[d + learner.extra]`` (default: the learner's model's
            parameters and the learner's own initial ones, ``learner.meta_params``).
        meta_batch: tasks per step (at most the pool size).
        lr: Adam's learning rate.
        clip_grad_norm: scale each meta-gradient down to this 2-norm (taken in float64) before
            Adam's step (None: never); rare huge ones stall Adam for ~1/(1 - beta2) steps.
            metrics.csv keeps ``grad_norm`` unclipped and adds a 0/1 ``clipped`` column.
        seed: seeds the task draws.
        resume: continue from ``out_dir/checkpoint.pt`` (RunConfigMismatch if ``out_dir`` holds a
            run with another ``config``, or one that has done more than ``meta_steps``); without
            it, an existing checkpoint is an error, not overwritten.
        checkpoint_every: steps between checkpoints.
        checkpoint_seconds: also save a checkpoint when this long has passed since the last one
            (None: by step count only).
        config: the run's settings (JSON-able), stored in ``config.json`` and compared on resume.
        progress: show a progress bar (tqdm).
        on_step: called as ``on_step(step, row)`` after every step (tests use it to interrupt).
        distributed: None/False: this process alone. True (or an
            :class:`amaml_ext.train.Distributed`): one rank of a ``torch.distributed`` job (the
            process group initialised by torchrun's environment if it is not yet): the tasks of
            each step are split over the ranks, their per-task meta-gradients summed in task
            order (the same theta bit for bit for any world size), rank 0 alone writes
            ``out_dir`` and reads the checkpoint (broadcast to the others), SIGINT/SIGTERM stop
            every rank at the same step boundary; every rank returns the same theta.

    Interrupted (Ctrl-C, or SIGTERM, which schedulers send before they preempt a job), it saves
    a checkpoint of every finished step and raises KeyboardInterrupt; ``resume=True`` continues
    to exactly the theta of an uninterrupted run.

    Raises:
        FloatingPointError: a meta-step's meta-gradient or query loss is not finite, or its
            (clipped) meta-gradient too large for Adam in theta's dtype (earlier steps are saved).
        FileExistsError: ``out_dir`` holds a run and ``resume`` is False.
        RunConfigMismatch: ``resume`` with other settings, or past ``meta_steps``.
        KeyboardInterrupt: (:class:`Terminated` for SIGTERM) after saving a checkpoint.
        ValueError: a bad argument (``meta_batch`` over the pool size, ...).

    Example:
        >>> import tempfile, torch
        >>> from amaml_ext import learners, models, tasks, train
        >>> learner = learners.FOMAML(models.mlp(width=8), torch.nn.functional.mse_loss, steps=2)
        >>> pool, tmp = tasks.CosMixture(shots=10, val=10).pool(4, seed=0), tempfile.TemporaryDirectory()
        >>> theta = train.meta_train(learner, pool, meta_steps=3, meta_batch=2, out_dir=tmp.name, progress=False)
        >>> theta.shape, train.load_checkpoint(tmp.name)["step"]
        (torch.Size([105]), 3)
        >>> tmp.cleanup()
    """
    group = Distributed.resolve(distributed)
    if out_dir is None:
        if resume:
            raise ValueError("argument 'resume' needs an 'out_dir' to resume from, got out_dir=None")
        with tempfile.TemporaryDirectory(prefix="amaml-run-") as tmp:
            return meta_train(learner, pool, meta_steps=meta_steps, out_dir=tmp, theta0=theta0, meta_batch=meta_batch,
                              lr=lr, seed=seed, checkpoint_every=checkpoint_every, device=device, dtype=dtype,
                              config=config, progress=progress, on_step=on_step, checkpoint_seconds=None,
                              distributed=group, clip_grad_norm=clip_grad_norm)
    _check_options(pool, meta_steps, meta_batch, checkpoint_every, lr, clip_grad_norm)
    config = run_settings(config, meta_batch=meta_batch, lr=lr, seed=seed,
                          tasks_per_call=1 if group is None else group.tasks_per_call, clip_grad_norm=clip_grad_norm)
    if group is None:
        ckpt = _open_run(out_dir, resume, config, meta_steps)
    else:
        ckpt = group.on_main(lambda: _open_run(out_dir, resume, config, meta_steps), "opening the run (rank 0)")
    try:                          # rank 0 holds the run directory's lock until the end
        run = _RunState(out_dir, learner, theta0, lr, device, dtype, ckpt, group)
        run.clip = clip_grad_norm
        return _train(run, learner, pool, meta_steps, meta_batch, seed, device, dtype,
                      (checkpoint_every, checkpoint_seconds), progress, on_step)
    finally:
        if group is None or group.is_main:
            unlock_run_dir(out_dir)


def run_settings(config: Optional[Dict], *, meta_batch: int, lr: float, seed: int, tasks_per_call: int = 1,
                 clip_grad_norm: Optional[float] = None) -> Dict:
    """The settings :func:`meta_train` stores in config.json (with ``meta_steps``) and compares on
    resume: ``config`` with the outer loop's, as JSON holds them (tuples become lists)."""
    config = dict(config or {}, meta_batch=meta_batch, lr=lr, seed=seed)
    if tasks_per_call != 1:              # it decides how each task's gradient is taken
        config["tasks_per_call"] = tasks_per_call
    if clip_grad_norm is not None:       # absent when unset, so runs made before it resume
        config["clip_grad_norm"] = clip_grad_norm
    try:
        return json.loads(json.dumps(config))
    except (TypeError, ValueError) as e:
        raise ValueError(f"argument 'config' must be JSON-able (it is stored in config.json): {e}") from None


def _train(run, learner, pool, meta_steps, meta_batch, seed, device, dtype, every, progress, on_step) -> torch.Tensor:
    """The meta-steps of an opened run from ``run.start`` to ``meta_steps``, and its final files;
    the learned theta."""
    out_dir, group = run.out_dir, run.group
    bar = _progress_bar(meta_steps, run.start, learner.name) if progress and run.writes else None
    try:
        with _interruptions(group) as stop:
            _steps(run, learner, pool, meta_steps, meta_batch, seed, device, dtype, every, bar, on_step, stop)
    except (AdjointAccuracyError, DistributedError) as e:
        done = run.save_done(bar)
        why = " (strict)" if isinstance(e, AdjointAccuracyError) else ""
        raise type(e)(f"meta_train stopped at meta-step {done + 1}{why}: {e} The checkpoint in {out_dir!r} holds "
                      f"the {done} meta-steps before it.") from None
    except KeyboardInterrupt as e:
        done = run.save_done(bar)
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        raise KeyboardInterrupt(f"meta_train {what} after meta-step {done}; checkpoint saved in "
                                f"{out_dir!r}: {RESUME_HINT}") from None
    if bar is not None:
        bar.close()
    if run.start >= meta_steps:  # nothing left to do: make sure the final files exist
        run.save(run.start)
    result = run.theta.detach().cpu().clone()
    if run.writes:
        atomic_write_bytes(os.path.join(out_dir, THETA), torch_bytes(result))
    if group is not None:
        group.barrier("the end of meta-training")     # theta.pt exists before any rank goes on
    return result


def _steps(run, learner, pool, meta_steps, meta_batch, seed, device, dtype, every, bar, on_step, stop) -> None:
    """The meta-steps from ``run.start``; in distributed mode the ranks first agree, at every step
    boundary, whether one of them received SIGINT/SIGTERM."""
    checkpoint_every, checkpoint_seconds = every
    for step in range(run.start, meta_steps):
        if run.group is not None:
            code = run.group.agree_max(stop.code)
            if code:
                raise Terminated() if code == StopFlags.CODES[signal.SIGTERM] else KeyboardInterrupt()
        idx = task_indices(seed, step, len(pool), meta_batch)
        row = run.step(learner, _meta_batch(pool, idx, step, seed, device, dtype), step, idx)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(query_loss=f"{row['query_loss']:.4g}")
        if ((step + 1) % checkpoint_every == 0 or step + 1 == meta_steps
                or (checkpoint_seconds is not None and time.monotonic() - run.last_save >= checkpoint_seconds)):
            run.save(step + 1)
        if on_step is not None:
            on_step(step + 1, row)


@contextmanager
def _interruptions(group):
    """Alone: SIGTERM raises :class:`Terminated` (Ctrl-C: KeyboardInterrupt). Distributed: both set
    a flag the ranks agree on at the next step boundary (:class:`StopFlags`)."""
    if group is not None:
        with StopFlags() as stop:
            yield stop
        return
    previous = _sigterm_as_interrupt()
    try:
        yield None
    finally:
        _restore_sigterm(previous)


def _check_options(pool, meta_steps, meta_batch, checkpoint_every, lr, clip_grad_norm) -> None:
    for name, v in (("meta_steps", meta_steps), ("meta_batch", meta_batch), ("checkpoint_every", checkpoint_every)):
        _checks.integer(name, v)
    if meta_batch > len(pool):
        raise ValueError(f"argument 'meta_batch' must be at most the pool size {len(pool)}, got {meta_batch}")
    _checks.positive("lr", lr)
    if clip_grad_norm is not None:
        _checks.positive("clip_grad_norm", clip_grad_norm)


def _progress_bar(total: int, start: int, name: str):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=start, desc=f"{name} meta-train", unit="step", dynamic_ncols=True, leave=True)


def _meta_batch(pool, idx: torch.Tensor, step: int, seed: int, device, dtype):
    """The tasks ``idx`` of a step; a pool that draws fresh data per visit (a resampling
    ``RatingPool``) has a ``draw`` method and is asked through it."""
    draw = getattr(pool, "draw", None)
    if draw is not None:
        return draw(idx, step=step, seed=seed, device=device, dtype=dtype)
    return pool.batch(idx, device=device, dtype=dtype)


def _open_run(out_dir: str, resume: bool, config: Dict, meta_steps: int) -> Optional[Dict]:
    """Lock the run directory (:func:`~amaml_ext.train.io.lock_run_dir`: made, refused if another
    process uses it, stale temporary files removed), refuse to overwrite a run or to resume one
    made with other settings or past ``meta_steps``, write config.json; the checkpoint to resume
    from (or None). The lock stays held (the caller releases it) unless this raises."""
    lock_run_dir(out_dir)
    try:
        try:
            with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".tmp-probe-"):
                pass
        except OSError as e:
            raise RunFileError(f"argument 'out_dir': cannot write the run directory {out_dir!r}: "
                               f"{e.strerror or e}") from None
        ckpt = load_checkpoint(out_dir)
        if ckpt is not None and not resume:
            raise FileExistsError(f"argument 'out_dir': {out_dir!r} already holds a run (step {ckpt['step']}); "
                                  f"pass resume=True (--resume) to continue it, or choose another directory")
        if resume and ckpt is not None:
            check_resumable(out_dir, config, meta_steps, ckpt)
        atomic_write_bytes(os.path.join(out_dir, CONFIG),
                           (json.dumps(dict(config, meta_steps=meta_steps), indent=2) + "\n").encode())
    except BaseException:
        unlock_run_dir(out_dir)
        raise
    return ckpt if resume else None


class _RunState:
    """theta, its Adam state and the metric rows of a run, restored from ``ckpt`` if given;
    ``step`` makes one meta-step, ``save`` writes the checkpoint and metrics atomically."""

    def __init__(self, out_dir: str, learner: MetaLearner, theta0, lr: float, device, dtype, ckpt: Optional[Dict],
                 group: Optional[Distributed] = None):
        self.out_dir, self.group = out_dir, group
        self.writes = group is None or group.is_main       # rank 0 alone writes the run's files
        theta0 = learner.meta_params(flatten_params(learner.model)) if theta0 is None else theta0
        self.theta = torch.nn.Parameter(theta0.detach().to(device=device, dtype=dtype).clone())
        if group is not None:      # every rank starts from rank 0's theta, whatever model it built
            group.broadcast_(self.theta)
        self.opt = torch.optim.Adam([self.theta], lr=lr)
        self.rows: List[Dict] = []
        self.clip: Optional[float] = None
        self.start = 0
        self.last_save = time.monotonic()
        if ckpt is None:
            return
        saved = ckpt["theta"]
        if not isinstance(saved, torch.Tensor) or saved.shape != self.theta.shape:
            got = tuple(saved.shape) if isinstance(saved, torch.Tensor) else type(saved).__name__
            raise UnreadableRunFile(f"{os.path.join(out_dir, CHECKPOINT)} (checkpoint) holds a theta of shape {got}, "
                                    f"the model has {tuple(self.theta.shape)}: it belongs to another model. It was "
                                    f"left as it is")
        with torch.no_grad():
            self.theta.copy_(saved.to(device=device, dtype=dtype))
        self.opt.load_state_dict(ckpt["optimizer"])
        self.rows = list(ckpt["metrics"])
        self.start = int(ckpt["step"])

    def save(self, step: int) -> None:
        self.last_save = time.monotonic()
        if not self.writes:
            return
        state = {"theta": self.theta.detach().cpu().clone(), "optimizer": self.opt.state_dict(), "step": step,
                 "metrics": self.rows}
        atomic_write_bytes(os.path.join(self.out_dir, CHECKPOINT), torch_bytes(state))
        atomic_write_bytes(os.path.join(self.out_dir, METRICS), csv_bytes(self.rows))

    def save_done(self, bar) -> int:
        """Save every finished step (on an interruption); their number."""
        self.save(len(self.rows))
        if bar is not None:
            bar.close()
        return len(self.rows)

    def step(self, learner: MetaLearner, batch, step: int, idx) -> Dict:
        """One Adam step on the meta-gradient of ``batch`` (clipped if asked); its metrics row. A
        non-finite meta-gradient or query loss, or one too large for Adam in theta's dtype, stops
        the run after saving the steps before it."""
        t0 = time.perf_counter()
        theta = self.theta.detach()
        try:
            out = learner.meta_grad(theta, batch) if self.group is None else self.group.meta_grad(learner, theta, batch)
        except FloatingPointError as e:              # the learner's own stop (a diverged inner loop, ...)
            self.save(len(self.rows))
            e.args = (f"meta_train stopped at meta-step {step + 1} (method {learner.name}, tasks {idx.tolist()}): "
                      f"{e}. The checkpoint in {self.out_dir!r} holds the {len(self.rows)} meta-steps before it.",)
            raise e.with_traceback(None) from None   # its type and attributes kept
        grad = out.grad.detach().reshape(self.theta.shape)
        grad_norm = float(grad.double().norm())     # float64: a finite float32 gradient has a finite norm
        bad = [what for what, ok in (("meta-gradient", math.isfinite(grad_norm)),
                                     ("query loss", bool(torch.isfinite(out.query_loss).all()))) if not ok]
        who = f"meta-step {step + 1} (method {learner.name}, tasks {idx.tolist()})"
        if bad:
            self._stop(f"the {' and the '.join(bad)} of {who} is not finite: " + (
                "the inner training diverged" if "query loss" in bad else
                "the query loss is finite, so the inner training did not diverge, but the meta-gradient is not")
                + " (lower the inner step size or the horizon)")
        scale = clip_scale(grad_norm, self.clip)
        largest = too_large_for_adam(grad, self.theta.dtype, scale)
        if largest is not None:
            self._stop(f"the meta-gradient of {who} is finite but too large for Adam in {self.theta.dtype} (its "
                       f"largest entry, {largest:.3g}, squared is past its range: Adam's second moment would overflow "
                       f"or freeze those entries of theta for the rest of the run): the inner run is exponentially sensitive to theta here "
                       f"(metrics.csv's grad_norm shows the growth); clip it (clip_grad_norm, --clip-grad-norm), "
                       f"train in float64, or lower the inner step size or the horizon")
        self.opt.zero_grad(set_to_none=True)
        self.theta.grad = (grad * scale if scale != 1.0 else grad).to(self.theta.dtype).clone()
        self.opt.step()
        row = {"step": step + 1, "query_loss": float(out.query_loss.mean()),
               "grad_norm": grad_norm, "seconds": time.perf_counter() - t0}
        if self.clip is not None:
            row["clipped"] = int(grad_norm > self.clip)
        for k in OPTIONAL_METRIC_FIELDS:     # e.g. A-MAML's adjoint error estimate
            if out.stats.get(k) is not None:
                row[k] = float(out.stats[k])
        self.rows.append(row)
        return row

    def _stop(self, why: str) -> None:
        """Save the finished steps and raise FloatingPointError saying ``why``."""
        self.save(len(self.rows))
        raise FloatingPointError(f"meta_train: {why}. Stopped; the checkpoint in {self.out_dir!r} holds the "
                                 f"{len(self.rows)} meta-steps before it.")


def clip_scale(norm: float, clip: Optional[float]) -> float:
    """The factor that brings a meta-gradient of 2-norm ``norm`` down to ``clip`` (1: no clipping)."""
    return 1.0 if clip is None or norm <= clip else clip / norm


def too_large_for_adam(grad: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> Optional[float]:
    """The largest entry of the finite meta-gradient ``grad`` times ``scale`` (:func:`clip_scale`),
    when its square is past ``dtype``'s range (Adam's second moment would overflow or freeze that
    entry of theta); else None."""
    largest = float(grad.abs().max()) * scale
    return largest if largest > math.sqrt(torch.finfo(dtype).max) else None


class Terminated(KeyboardInterrupt):
    """SIGTERM received: handled like Ctrl-C (a checkpoint is saved).

    Example:
        >>> from amaml_ext import train
        >>> issubclass(train.Terminated, KeyboardInterrupt)     # ``except KeyboardInterrupt`` sees both
        True
    """


def _sigterm_as_interrupt():
    """Make SIGTERM raise :class:`Terminated` in the main thread; returns the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise Terminated()
    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)

