"""Host memory: resident set and its high-water mark (Linux /proc), ``ru_maxrss``, free memory.

Peak memory of a CPU run is the high-water mark above a baseline. ``getrusage().ru_maxrss``
alone cannot give it: a child started by fork/exec inherits its parent's high-water mark, so
a small run reads 0 above its baseline. On Linux the mark is reset at the baseline
(``echo 5 > /proc/self/clear_refs``) and read back as ``VmHWM`` instead."""

import os
import resource
import sys
from typing import Optional


def proc_status_bytes(key: str, pid="self") -> Optional[int]:
    """A ``/proc/<pid>/status`` field given in kB (``VmRSS``, ``VmHWM``) in bytes; None where
    unavailable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def maxrss_bytes() -> int:
    """This process's ``ru_maxrss`` in bytes (kB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its VmRSS (Linux); True if done."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return proc_status_bytes("VmHWM") is not None
    except OSError:
        return False


def trim_heap() -> None:
    """Give free malloc memory back to the OS, so that a baseline holds no reusable slack."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def mem_available_bytes() -> int:
    """``MemAvailable`` of /proc/meminfo in bytes; 0 where unavailable."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def free_pages_bytes(default: int = 4 * 2**30) -> int:
    """Free physical memory (``SC_AVPHYS_PAGES`` x page size), or ``default`` where unknown."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return default
