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

import csv
import io
import json
import math
import os
import signal
import tempfile
import threading
import time
from typing import Callable, Dict, List, Optional

import torch

from .accuracy import AdjointAccuracyError
from .functional import TaskFunctions, flatten_params, unflatten_params
from .learners import MetaLearner
from .tasks import TaskBatch, TaskPool

__all__ = ["meta_train", "meta_test", "nrmse", "accuracy", "task_indices", "atomic_write_bytes", "load_checkpoint",
           "RunConfigMismatch", "RunFileError", "UnreadableRunFile"]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"
THETA = "theta.pt"
CONFIG = "config.json"
METRIC_FIELDS = ["step", "query_loss", "grad_norm", "seconds"]
OPTIONAL_METRIC_FIELDS = ["adjoint_error_estimate", "h_lambda_max"]
"""Written to metrics.csv when the learner reports them (A-MAML with a continuous adjoint)."""


class RunConfigMismatch(ValueError):
    """``resume`` found a run directory made with other settings."""


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename:
    a reader (or a crash) sees either the old file or the new one, never a partial file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _csv_bytes(rows: List[Dict]) -> bytes:
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


def task_indices(seed: int, step: int, pool_size: int, meta_batch: int) -> torch.Tensor:
    """The meta-batch of step ``step``: ``meta_batch`` distinct pool indices, a function of
    ``(seed, step)`` only."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))
    if pool_size <= 1_000_000:
        return torch.randperm(pool_size, generator=g)[:meta_batch]
    # a huge pool (a stream of episodes): draw until meta_batch distinct indices, no permutation
    picked: List[int] = []
    while len(picked) < meta_batch:
        for i in torch.randint(pool_size, (meta_batch,), generator=g).tolist():
            if i not in picked and len(picked) < meta_batch:
                picked.append(i)
    return torch.tensor(picked, dtype=torch.long)


def meta_train(learner: MetaLearner, pool: TaskPool, *, meta_steps: int, out_dir: Optional[str] = None,
               theta0: Optional[torch.Tensor] = None,
               meta_batch: int = 5, lr: float = 1e-3, seed: int = 0, resume: bool = False,
               checkpoint_every: int = 50, device="cpu", dtype=torch.float32, config: Optional[Dict] = None,
               progress: bool = True, on_step: Optional[Callable[[int, Dict], None]] = None,
               checkpoint_seconds: Optional[float] = 600.0) -> torch.Tensor:
    """Meta-train ``learner`` on ``pool`` for ``meta_steps`` Adam steps; returns the learned theta.

    Args:
        learner: a :class:`amaml_ext.learners.MetaLearner`.
        pool: the meta-training tasks (a pool with a ``draw(index, step=, seed=, device=,
            dtype=)`` method, like a resampling ``RatingPool``, is asked for each step's data
            through it; otherwise ``pool.batch(index)``).
        meta_steps: total number of outer steps (a resumed run continues up to it).
        out_dir: run directory (created); see the module doc for its files. None: no files are
            kept (a temporary directory holds the checkpoints during the run; nothing to resume).
        theta0: initial theta ``[d]`` (default: the learner's model's parameters).
        meta_batch: tasks per step (at most the pool size).
        lr: Adam's learning rate.
        seed: seeds the task draws.
        resume: continue from ``out_dir/checkpoint.pt`` (an error if ``out_dir`` holds a run with
            another ``config``); without it, an existing checkpoint is an error, not overwritten.
        checkpoint_every: steps between checkpoints.
        checkpoint_seconds: also save a checkpoint when this long has passed since the last one
            (None: by step count only).
        config: the run's settings (JSON-able), stored in ``config.json`` and compared on resume.
        progress: show a progress bar (tqdm).
        on_step: called as ``on_step(step, row)`` after every step (tests use it to interrupt).

    Interrupted (Ctrl-C, or SIGTERM, which schedulers send before they preempt a job), it saves
    a checkpoint of every finished step and raises KeyboardInterrupt; ``resume=True`` continues
    to exactly the theta of an uninterrupted run. A meta-step whose meta-gradient or query loss is
    not finite stops the run with FloatingPointError, after saving the steps before it.
    """
    if out_dir is None:
        if resume:
            raise ValueError("argument 'resume' needs an 'out_dir' to resume from, got out_dir=None")
        with tempfile.TemporaryDirectory(prefix="amaml-run-") as tmp:
            return meta_train(learner, pool, meta_steps=meta_steps, out_dir=tmp, theta0=theta0, meta_batch=meta_batch,
                              lr=lr, seed=seed, checkpoint_every=checkpoint_every, device=device, dtype=dtype,
                              config=config, progress=progress, on_step=on_step, checkpoint_seconds=None)
    for name, v in (("meta_steps", meta_steps), ("meta_batch", meta_batch), ("checkpoint_every", checkpoint_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"argument '{name}' must be a positive int, got {v!r}")
    if meta_batch > len(pool):
        raise ValueError(f"argument 'meta_batch' must be at most the pool size {len(pool)}, got {meta_batch}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"argument 'lr' must be a positive finite number, got {lr!r}")
    config = dict(config or {}, meta_batch=meta_batch, lr=lr, seed=seed)
    ckpt = _open_run(out_dir, resume, config, meta_steps)
    run = _RunState(out_dir, learner, theta0, lr, device, dtype, ckpt)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=meta_steps, initial=run.start, desc=f"{learner.name} meta-train", unit="step",
                   dynamic_ncols=True, leave=True)
    previous = _sigterm_as_interrupt()
    try:
        for step in range(run.start, meta_steps):
            idx = task_indices(seed, step, len(pool), meta_batch)
            draw = getattr(pool, "draw", None)      # pools that draw fresh data per visit (RatingPool)
            batch = (draw(idx, step=step, seed=seed, device=device, dtype=dtype) if draw is not None
                     else pool.batch(idx, device=device, dtype=dtype))
            row = run.step(learner, batch, step, idx)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(query_loss=f"{row['query_loss']:.4g}")
            if ((step + 1) % checkpoint_every == 0 or step + 1 == meta_steps
                    or (checkpoint_seconds is not None and time.monotonic() - run.last_save >= checkpoint_seconds)):
                run.save(step + 1)
            if on_step is not None:
                on_step(step + 1, row)
    except AdjointAccuracyError as e:
        done = run.save_done(bar)
        raise AdjointAccuracyError(f"meta_train stopped at meta-step {done + 1} (strict): {e} The checkpoint in "
                                   f"{out_dir!r} holds the {done} meta-steps before it.") from None
    except KeyboardInterrupt as e:
        done = run.save_done(bar)
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        raise KeyboardInterrupt(f"meta_train {what} after meta-step {done}; checkpoint saved in "
                                f"{out_dir!r}: run again with resume=True (--resume) to continue") from None
    finally:
        _restore_sigterm(previous)
    if bar is not None:
        bar.close()
    if run.start >= meta_steps:  # nothing left to do: make sure the final files exist
        run.save(run.start)
    result = run.theta.detach().cpu().clone()
    atomic_write_bytes(os.path.join(out_dir, THETA), _torch_bytes(result))
    return result


def _open_run(out_dir: str, resume: bool, config: Dict, meta_steps: int) -> Optional[Dict]:
    """Create (or check) the run directory, refuse to overwrite a run or to resume one made with
    other settings, write config.json; the checkpoint to resume from (or None)."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".tmp-probe-"):
            pass
    except OSError as e:
        raise RunFileError(f"argument 'out_dir': cannot write the run directory {out_dir!r}: {e.strerror or e}") from None
    cfg_path = os.path.join(out_dir, CONFIG)
    ckpt = load_checkpoint(out_dir)
    if ckpt is not None and not resume:
        raise FileExistsError(f"argument 'out_dir': {out_dir!r} already holds a run (step {ckpt['step']}); "
                              f"pass resume=True (--resume) to continue it, or choose another directory")
    if resume and ckpt is not None and os.path.exists(cfg_path):
        old = read_json_file(cfg_path, "the run's settings")
        diff = {k: (old.get(k), config.get(k)) for k in set(old) | set(config)
                if k not in ("meta_steps", "data_root") and old.get(k) != config.get(k)}
        if diff:
            raise RunConfigMismatch(f"cannot resume the run in {out_dir!r}: its settings differ (saved vs now): {diff}")
    atomic_write_bytes(cfg_path, (json.dumps(dict(config, meta_steps=meta_steps), indent=2) + "\n").encode())
    return ckpt if resume else None


class _RunState:
    """theta, its Adam state and the metric rows of a run, restored from ``ckpt`` if given;
    ``step`` makes one meta-step, ``save`` writes the checkpoint and metrics atomically."""

    def __init__(self, out_dir: str, learner: MetaLearner, theta0, lr: float, device, dtype, ckpt: Optional[Dict]):
        self.out_dir = out_dir
        theta0 = flatten_params(learner.model) if theta0 is None else theta0
        self.theta = torch.nn.Parameter(theta0.detach().to(device=device, dtype=dtype).clone())
        self.opt = torch.optim.Adam([self.theta], lr=lr)
        self.rows: List[Dict] = []
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
        state = {"theta": self.theta.detach().cpu().clone(), "optimizer": self.opt.state_dict(), "step": step,
                 "metrics": self.rows}
        atomic_write_bytes(os.path.join(self.out_dir, CHECKPOINT), _torch_bytes(state))
        atomic_write_bytes(os.path.join(self.out_dir, METRICS), _csv_bytes(self.rows))

    def save_done(self, bar) -> int:
        """Save every finished step (on an interruption); their number."""
        self.save(len(self.rows))
        if bar is not None:
            bar.close()
        return len(self.rows)

    def step(self, learner: MetaLearner, batch, step: int, idx) -> Dict:
        """One Adam step on the meta-gradient of ``batch``; its metrics row. A non-finite
        meta-gradient, norm or query loss stops the run after saving the steps before it."""
        t0 = time.perf_counter()
        out = learner.meta_grad(self.theta.detach(), batch)
        grad_norm = float(out.grad.norm())      # inf or NaN for any non-finite entry, or on overflow
        bad = [what for what, ok in (("meta-gradient", math.isfinite(grad_norm)),
                                     ("query loss", bool(torch.isfinite(out.query_loss).all()))) if not ok]
        if bad:
            self.save(len(self.rows))
            raise FloatingPointError(
                f"meta_train: the {' and the '.join(bad)} of meta-step {step + 1} (method {learner.name}, "
                f"tasks {idx.tolist()}) is not finite: the inner training diverged (lower the inner step "
                f"size or the horizon). Stopped; the checkpoint in {self.out_dir!r} holds the {len(self.rows)} "
                f"meta-steps before it.")
        self.opt.zero_grad(set_to_none=True)
        self.theta.grad = out.grad.detach().to(self.theta.dtype).reshape(self.theta.shape).clone()
        self.opt.step()
        row = {"step": step + 1, "query_loss": float(out.query_loss.mean()),
               "grad_norm": grad_norm, "seconds": time.perf_counter() - t0}
        for k in OPTIONAL_METRIC_FIELDS:     # e.g. A-MAML's adjoint error estimate
            if out.stats.get(k) is not None:
                row[k] = float(out.stats[k])
        self.rows.append(row)
        return row


class Terminated(KeyboardInterrupt):
    """SIGTERM received: handled like Ctrl-C (a checkpoint is saved)."""


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


def nrmse(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Normalised RMSE per task: ``||pred - y|| / ||y||`` over each task's points
    (``[B, k, 1]`` -> ``[B]``); with ``mask`` (``[B, k]`` bool) over the marked points only."""
    err, ref = (pred - target).pow(2), target.pow(2)
    if mask is not None:
        m = mask.reshape(mask.shape + (1,) * (pred.dim() - mask.dim())).to(err.dtype)
        err, ref = err * m, ref * m
    dims = tuple(range(1, pred.dim()))
    return err.sum(dims).sqrt() / ref.sum(dims).sqrt().clamp_min(1e-30)


def accuracy(logits: torch.Tensor, labels: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Classification accuracy per task (``[B, k, classes]``, ``[B, k]`` -> ``[B]``); with
    ``mask`` (``[B, k]`` bool) over the marked points only."""
    hit = (logits.argmax(-1) == labels).to(torch.float64)
    if mask is None:
        return hit.mean(-1)
    m = mask.to(torch.float64)
    return (hit * m).sum(-1) / m.sum(-1).clamp_min(1)


METRICS_FNS = {"nrmse": nrmse, "accuracy": accuracy}


def meta_test(model: torch.nn.Module, loss, theta: torch.Tensor, tasks: TaskBatch, *, steps: int,
              lr: float = 0.01, record_every: int = 1, metric: str = "nrmse",
              chunk: int = 100, adapt_mask: Optional[torch.Tensor] = None) -> Dict[str, List[float]]:
    """Adapt from ``theta`` on every task's support set with ``steps`` plain GD steps of ``lr``
    (``chunk`` tasks at a time, batched) and record the query ``metric`` (``"nrmse"`` or
    ``"accuracy"``; over the real points of ``tasks.query_mask`` when there is one) after every
    ``record_every`` steps. ``adapt_mask`` (``[d]``, 0/1) adapts only the marked parameters
    (ANIL: the head).

    Returns ``{"metric", "step": [...], "mean": [...], "std": [...], "ci95": [...], "final":
    [per-task value]}`` (std over tasks, population; ``ci95 = 1.96 std / sqrt(tasks)``)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"argument 'steps' must be a non-negative int, got {steps!r}")
    if metric not in METRICS_FNS:
        raise ValueError(f"argument 'metric' must be one of {sorted(METRICS_FNS)}, got {metric!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"argument 'chunk' must be a positive int, got {chunk!r}")
    score = METRICS_FNS[metric]
    recorded = [s for s in range(steps + 1) if s % record_every == 0 or s == steps]
    per_task: List[List[torch.Tensor]] = [[] for _ in recorded]
    B = tasks.size
    for a in range(0, B, chunk):
        part = tasks.select(slice(a, a + chunk))
        fns = TaskFunctions(model, loss, part.support, part.query, batched=True)
        u = theta.detach().to(part.support[0].dtype).expand(part.size, -1).clone()

        def value():
            with torch.no_grad():
                pred = torch.func.vmap(lambda w, x: torch.func.functional_call(
                    fns.module, (unflatten_params(fns.model, w), fns.buffers), (x,)))(u, part.query[0])
                return score(pred, part.query[1], part.query_mask)

        k = 0
        if recorded[0] == 0:
            per_task[0].append(value())
            k = 1
        with torch.no_grad():
            for s in range(1, steps + 1):
                g = fns.grad(u)
                u = u - lr * (g if adapt_mask is None else g * adapt_mask.to(g))
                if k < len(recorded) and s == recorded[k]:
                    per_task[k].append(value())
                    k += 1
    out = {"metric": metric, "step": recorded, "mean": [], "std": [], "ci95": []}
    for vals in per_task:
        e = torch.cat(vals)
        sd = float(e.std(unbiased=False))
        out["mean"].append(float(e.mean()))
        out["std"].append(sd)
        out["ci95"].append(1.96 * sd / math.sqrt(e.numel()))
    out["final"] = torch.cat(per_task[-1]).tolist()
    return out
