"""Child processes: a benchmark runs what may crash, hang or eat the memory (a point of a sweep,
a torch.compile, a crash-prone transform) in a fresh Python process and reads its stdout line
by line, so that the parent can enforce time and memory limits and report instead of dying."""

import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parents[2]
"""The repository root: children run there, so ``python -m benchmarks.<name>`` imports the same
``benchmarks`` and ``amaml_ext`` as the parent."""


def module_command(module: str, *args: str) -> List[str]:
    """``python -m module args...`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


class Child:
    """A child process started in :data:`REPO`; its stdout lines arrive through a queue filled by
    a reader thread, its stderr is kept as a tail of ``tail`` lines.

    ``own_session``: the child leads a new process group, and :meth:`kill` ends the whole group
    (for example inductor's compile workers)."""

    def __init__(self, cmd: List[str], env: Optional[dict] = None, own_session: bool = False, tail: int = 20):
        self.own_session = own_session
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                     env=env, start_new_session=own_session)
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self._tail = tail
        self.err_tail: List[str] = []
        self._threads = [threading.Thread(target=self._pump_out, daemon=True),
                         threading.Thread(target=self._pump_err, daemon=True)]
        for t in self._threads:
            t.start()

    def _pump_out(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _pump_err(self) -> None:
        for line in self.proc.stderr:
            self.err_tail.append(line)
            del self.err_tail[:-self._tail]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def next_line(self, timeout: float) -> Optional[str]:
        """The next stdout line (with its newline); ``""`` if none came within ``timeout``
        seconds; None once the output has ended."""
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            return ""

    def kill(self) -> None:
        """SIGKILL the child (its process group with ``own_session``)."""
        try:
            if self.own_session:
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                self.proc.kill()
        except ProcessLookupError:
            pass

    def wait(self) -> int:
        """Wait for the exit and for the readers; the exit code (negative: killed by a signal)."""
        self.proc.wait()
        for t in self._threads:
            t.join(timeout=5)
        return self.proc.returncode

    def stderr_lines(self) -> List[str]:
        """The non-blank lines of the stderr tail."""
        return [ln.rstrip("\n") for ln in self.err_tail if ln.strip()]

    def killed_by(self) -> Optional[str]:
        """The name of the signal that ended the child (``SIGSEGV``), or None if it exited."""
        rc = self.proc.returncode
        if rc is None or rc >= 0:
            return None
        try:
            return signal.Signals(-rc).name
        except ValueError:
            return f"signal {-rc}"
