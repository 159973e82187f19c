"""A run directory's files: names, atomic writes, reading them back with errors that name the
file and leave it as it is, the settings a run may not change, and the directory's lock."""

import csv
import errno
import io
import json
import os
import socket
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .._io import TMP_PREFIX, atomic_write_bytes, torch_bytes

try:
    import fcntl
except ImportError:  # pragma: no cover  (not POSIX: runs are not locked)
    fcntl = None

__all__ = ["CHECKPOINT", "METRICS", "THETA", "CONFIG", "LOCK", "METRIC_FIELDS", "OPTIONAL_METRIC_FIELDS",
           "CHECKPOINT_KEYS", "NOT_COMPARED", "RunConfigMismatch", "RunFileError", "RunLocked", "UnreadableRunFile",
           "atomic_write_bytes", "torch_bytes", "csv_bytes", "read_torch_file", "read_json_file", "load_checkpoint",
           "settings_diff", "check_resumable", "check_writable", "lock_run_dir", "unlock_run_dir", "run_dir_locked",
           "remove_stale_temp_files"]

CHECKPOINT = "checkpoint.pt"
"""A run directory's checkpoint: theta, Adam's state, the step and the metrics (:data:`CHECKPOINT_KEYS`)."""
METRICS = "metrics.csv"
"""A run directory's metrics, one row per meta-step (:data:`METRIC_FIELDS`)."""
THETA = "theta.pt"
"""The learned initialisation (a flat tensor), written when the run completes."""
CONFIG = "config.json"
"""The run's settings, compared on resume."""
LOCK = ".amaml-ext.lock"
"""The lock file of a run directory: it exists while a process uses the directory (it holds an
``flock`` on it, which the system drops when the process ends) and names that process."""
METRIC_FIELDS = ["step", "query_loss", "grad_norm", "seconds"]
"""The columns of metrics.csv (the optional ones go before ``seconds``)."""
OPTIONAL_METRIC_FIELDS = ["adjoint_error_estimate", "h_lambda_max", "clipped"]
"""Written to metrics.csv when some row has them: the first two when the learner reports them
(A-MAML with a continuous adjoint), ``clipped`` (1 or 0) when the run clips its meta-gradient."""


class RunConfigMismatch(ValueError):
    """``resume`` found a run directory made with other settings (or one past ``meta_steps``).

    Example:
        >>> import tempfile, torch
        >>> from amaml_ext import learners, models, tasks, train
        >>> learner = learners.FOMAML(models.mlp(width=8), torch.nn.functional.mse_loss, steps=2)
        >>> pool, tmp = tasks.CosMixture(shots=10, val=10).pool(4, seed=0), tempfile.TemporaryDirectory()
        >>> _ = train.meta_train(learner, pool, meta_steps=1, meta_batch=2, out_dir=tmp.name, progress=False)
        >>> train.meta_train(learner, pool, meta_steps=2, meta_batch=3, out_dir=tmp.name, progress=False, resume=True)
        Traceback (most recent call last):
        ...
        amaml_ext.train.io.RunConfigMismatch: the run in '...' was made with other settings, ... {'meta_batch': (2, 3)}
        >>> tmp.cleanup()
    """


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
    """The run directory cannot be written, or one of its files read; the base of
    :class:`UnreadableRunFile` (a ValueError).

    Example:
        >>> from amaml_ext import train
        >>> issubclass(train.UnreadableRunFile, train.RunFileError), issubclass(train.RunFileError, ValueError)
        (True, True)
    """


class UnreadableRunFile(RunFileError):
    """A run file (checkpoint.pt, config.json, theta.pt) that cannot be read; it is left as it is.

    Example:
        >>> import os, tempfile
        >>> from amaml_ext import train
        >>> tmp = tempfile.TemporaryDirectory()
        >>> with open(os.path.join(tmp.name, "checkpoint.pt"), "wb") as f:
        ...     _ = f.write(b"truncated")
        >>> train.load_checkpoint(tmp.name)
        Traceback (most recent call last):
        ...
        amaml_ext.train.io.UnreadableRunFile: .../checkpoint.pt (checkpoint) is unreadable: ...
        >>> tmp.cleanup()
    """


CHECKPOINT_KEYS = ("theta", "optimizer", "step", "metrics")
"""The keys every checkpoint holds."""


def read_torch_file(path: str, what: str):
    """``torch.load`` of a run file (``weights_only``, onto the CPU), or :class:`UnreadableRunFile`
    naming it and ``what`` it is (touching nothing).

    Example:
        >>> import os, tempfile, torch
        >>> from amaml_ext import train
        >>> tmp = tempfile.TemporaryDirectory(); path = os.path.join(tmp.name, train.THETA)
        >>> torch.save(torch.zeros(3), path)
        >>> train.read_torch_file(path, "theta")
        tensor([0., 0., 0.])
        >>> tmp.cleanup()
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (truncated, empty, garbage: all unreadable)
        raise UnreadableRunFile(f"{path} ({what}) is unreadable: {type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200] if str(e) else ''}. It was left as it is; "
                                f"move it away to start afresh") from None


def read_json_file(path: str, what: str) -> Dict:
    """``json.load`` of a run file (an object), or :class:`UnreadableRunFile` naming it.

    Example:
        >>> import os, tempfile
        >>> from amaml_ext import train
        >>> tmp = tempfile.TemporaryDirectory(); path = os.path.join(tmp.name, train.CONFIG)
        >>> with open(path, "w") as f:
        ...     _ = f.write('{"seed": 0}')
        >>> train.read_json_file(path, "config")
        {'seed': 0}
        >>> tmp.cleanup()
    """
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
    """The run's checkpoint in ``out_dir`` (None if there is none): a dict of
    :data:`CHECKPOINT_KEYS`.

    Raises:
        UnreadableRunFile: it is damaged or lacks keys.

    Example:
        >>> import tempfile, torch
        >>> from amaml_ext import learners, models, tasks, train
        >>> learner = learners.FOMAML(models.mlp(width=8), torch.nn.functional.mse_loss, steps=2)
        >>> pool, tmp = tasks.CosMixture(shots=10, val=10).pool(4, seed=0), tempfile.TemporaryDirectory()
        >>> train.load_checkpoint(tmp.name) is None
        True
        >>> _ = train.meta_train(learner, pool, meta_steps=2, meta_batch=2, out_dir=tmp.name, progress=False)
        >>> ck = train.load_checkpoint(tmp.name)
        >>> ck["step"], ck["theta"].shape, list(ck["metrics"][0])
        (2, torch.Size([105]), ['step', 'query_loss', 'grad_norm', 'seconds'])
        >>> tmp.cleanup()
    """
    path = os.path.join(out_dir, CHECKPOINT)
    if not os.path.exists(path):
        return None
    ck = read_torch_file(path, "checkpoint")
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise UnreadableRunFile(f"{path} (checkpoint) is unreadable: it lacks {missing}. It was left as it is")
    return ck



# ---- the settings of a run ----------------------------------------------------------------------

NOT_COMPARED = ("meta_steps", "data_root", "compile", "device")
"""Settings a run may resume with changed: its length (not below the steps done), where the data
is read from, whether the callbacks are compiled and the device (``cuda`` alone or
``cuda:<rank>`` under torchrun): the same gradients up to rounding."""


def settings_diff(old: Dict, new: Dict) -> Dict[str, Tuple]:
    """``{setting: (old, new)}`` for every compared setting that differs."""
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if k not in NOT_COMPARED and old.get(k) != new.get(k)}


def check_resumable(out_dir: str, config: Dict, meta_steps: int, ckpt: Dict) -> None:
    """Refuse (RunConfigMismatch) to continue the run in ``out_dir``, at its checkpoint ``ckpt``,
    with other settings than its config.json holds, or up to fewer meta-steps than it has done."""
    cfg_path = os.path.join(out_dir, CONFIG)
    if not os.path.exists(cfg_path):
        raise RunConfigMismatch(f"the run in {out_dir!r} has a checkpoint but no {CONFIG}, so its settings cannot be "
                                f"checked against these: restore {CONFIG}, or start the run in another directory")
    diff = settings_diff(read_json_file(cfg_path, "the run's settings"), config)
    if diff:
        raise RunConfigMismatch(f"the run in {out_dir!r} was made with other settings, so it cannot be continued "
                                f"or reported as one made with these (saved vs now): {diff}")
    done = int(ckpt["step"])
    if done > meta_steps:
        raise RunConfigMismatch(
            f"argument 'meta_steps' (--meta-steps): the run in {out_dir!r} has already done {done} meta-steps, "
            f"more than the {meta_steps} asked for, and steps cannot be undone: ask for {done} or more to continue "
            f"it (its theta.pt is the {done}-step result), or train the shorter run into another directory")


# ---- the lock of a run directory ------------------------------------------------------------------

class RunLocked(RunFileError):
    """Another process is using the run directory (it holds the directory's lock)."""


_HELD: Dict[str, List] = {}
"""The run directories this process holds: real path -> [lock file descriptor, holds, lock path]."""


def lock_run_dir(out_dir: str, create: bool = True, option: str = "'out_dir'") -> None:
    """Lock the run directory ``out_dir`` (made if ``create``) for this process: ``flock`` on its
    :data:`LOCK` file, which names this process (pid, host, start, command). Another process
    holding it: :class:`RunLocked` naming it; the system drops a lock when its process ends, so a
    lock file left by a killed process does not block. Re-entrant (holds are counted; release
    each with :func:`unlock_run_dir`). The first hold removes the stale temporary files that a
    killed write left in the directory. A directory that cannot be written: RunFileError naming
    ``option``."""
    if create:
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:
            raise _unwritable(out_dir, e, option) from None
    key = os.path.realpath(out_dir)
    if key in _HELD:
        _HELD[key][1] += 1
        return
    path = os.path.join(key, LOCK)
    _HELD[key] = [_take_lock(out_dir, path, option), 1, path]
    remove_stale_temp_files(out_dir)


def unlock_run_dir(out_dir: str) -> None:
    """Release one hold of :func:`lock_run_dir`; the last removes the lock file and unlocks."""
    key = os.path.realpath(out_dir)
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] > 0:
        return
    del _HELD[key]
    fd, _, path = held
    try:
        os.unlink(path)           # still locked: a process that opened it before sees it gone, and retries
    except OSError:
        pass
    os.close(fd)


@contextmanager
def run_dir_locked(out_dir: str, create: bool = True, option: str = "'out_dir'"):
    """:func:`lock_run_dir` for the ``with`` block."""
    lock_run_dir(out_dir, create, option)
    try:
        yield
    finally:
        unlock_run_dir(out_dir)


def remove_stale_temp_files(out_dir: str) -> List[str]:
    """Remove the temporary files (``.tmp-*``) of atomic writes that a killed process left in
    ``out_dir`` (call it holding the directory's lock); their names."""
    gone = []
    for name in sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, name)
        if name.startswith(TMP_PREFIX) and os.path.isfile(path) and not os.path.islink(path):
            try:
                os.unlink(path)
                gone.append(name)
            except OSError:
                pass
    return gone


def check_writable(directory: str, names: Sequence[str], option: str = "'out_dir'") -> None:
    """Refuse (RunFileError naming ``option``) before any work when the files ``names`` cannot be
    written into ``directory`` (as :func:`atomic_write_bytes` writes: a temporary file renamed)."""
    where = f"argument {option}: cannot write {', '.join(names)} into {directory!r}"
    if not os.access(directory, os.W_OK | os.X_OK):
        raise RunFileError(f"{where}: permission denied (os.access)")
    for name in names:
        if os.path.isdir(os.path.join(directory, name)):
            raise RunFileError(f"{where}: {name} is a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=TMP_PREFIX + "probe-"):
            pass
    except OSError as e:
        raise RunFileError(f"{where}: {e.strerror or e}") from None


def _unwritable(out_dir: str, e: OSError, option: str = "'out_dir'") -> RunFileError:
    return RunFileError(f"argument {option}: cannot write the run directory {out_dir!r}: {e.strerror or e}")


def _take_lock(out_dir: str, path: str, option: str) -> int:
    """Open and flock ``path``, retrying while the file we locked is not the one at ``path`` (a
    holder removed it as it released it); the descriptor, with this process recorded in it."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise _unwritable(out_dir, e, option) from None
        if fcntl is None:
            break
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):   # a filesystem without locks
                warnings.warn(f"amaml_ext: cannot lock the run directory {out_dir!r} ({e.strerror or e}); "
                              f"nothing keeps two processes from writing it at once", RuntimeWarning, stacklevel=4)
                return fd
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.close(fd)
            raise RunLocked(f"the run directory {out_dir!r} is in use by another process ({_describe(holder)}); "
                            f"wait for it to end (or stop it), or choose another directory") from None
        try:
            st = os.stat(path)
            ours = (st.st_ino, st.st_dev) == (os.fstat(fd).st_ino, os.fstat(fd).st_dev)
        except FileNotFoundError:
            ours = False
        if ours:
            break
        os.close(fd)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %z"),
          "command": " ".join(sys.argv)[:300]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    return fd


def _describe(holder: str) -> str:
    """The lock holder recorded in a lock file, in words."""
    try:
        h = json.loads(holder)
        return f"pid {h['pid']} on {h['host']}, since {h['since']}: {h['command']}"
    except (ValueError, KeyError, TypeError):
        return "one that has not yet recorded itself in the lock file"
