"""Timing: device synchronisation, timed calls and the medians every benchmark reports."""

import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch


def sync(device) -> None:
    """Wait for the device's queued work (no-op on the CPU). ``device``: str or torch.device."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable, device) -> Callable:
    """``fn`` followed by a device synchronisation: what a pytest benchmark times."""
    if torch.device(device).type == "cuda":
        def run():
            fn()
            torch.cuda.synchronize()
        return run
    return fn


def median_time(fn: Callable[[], object], device, repeats: int, warmup: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after ``warmup`` runs: CUDA events on a
    GPU (the kernels' time, without waiting on the host), ``time.perf_counter`` on the CPU."""
    for _ in range(warmup):
        fn()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def call_time(fn: Callable[[], object], device) -> float:
    """Seconds of one call of ``fn`` including the wait for the device."""
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def median_call_time(fn: Callable[[], object], device, budget_s: float = 0.5, min_calls: int = 5,
                     max_calls: int = 50) -> float:
    """Median seconds of one synchronised call of ``fn`` after a warm-up call: as many calls as
    fit in ``budget_s`` (judged by the first timed call), between ``min_calls`` and ``max_calls``."""
    fn()
    sync(device)
    first = call_time(fn, device)
    n = int(max(min_calls, min(max_calls, budget_s / max(first, 1e-9))))
    return statistics.median([first] + [call_time(fn, device) for _ in range(n - 1)])


def quartile_stats(times: List[float]) -> Dict:
    """Median, quartiles, minimum and count of ``times`` (seconds)."""
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0], times[0], times[0]]
    return {"median_s": statistics.median(times), "q1_s": q[0], "q3_s": q[2], "min_s": min(times),
            "repeats": len(times)}


def measure_interleaved(fns: Dict[str, Tuple[Callable, int, int]], device, warmup: int, min_repeats: int,
                        min_time: float) -> Dict[str, Dict]:
    """Time several functions in round-robin rounds (rotating the order every round), so that
    load from other processes on a shared machine hits all of them alike.

    ``fns``: name -> (fn, calls_per_repeat, max_repeats); a time is per call (a repeat's time
    divided by ``calls_per_repeat``). Each function is repeated until it has at least
    ``min_repeats`` timings and ``min_time`` seconds of them, or ``max_repeats``, after
    ``warmup`` untimed calls. Returns name -> :func:`quartile_stats`.
    """
    for fn, _, max_rep in fns.values():
        for _ in range(min(warmup, max_rep)):
            fn()
    sync(device)
    times: Dict[str, List[float]] = {n: [] for n in fns}
    spent = dict.fromkeys(fns, 0.0)
    r = 0
    while True:
        active = [n for n, (_, _, max_rep) in fns.items() if len(times[n]) < max_rep
                  and (len(times[n]) < min_repeats or spent[n] < min_time)]
        if not active:
            break
        k = r % len(active)
        for n in active[k:] + active[:k]:
            fn, per_call, _ = fns[n]
            dt = call_time(fn, device)
            times[n].append(dt / per_call)
            spent[n] += dt
        r += 1
    return {n: quartile_stats(t) for n, t in times.items()}


def rounds(calls: Dict[str, Callable[[], object]], reps: int) -> Tuple[Dict[str, float], Dict[str, object]]:
    """One untimed call of each (warm-up, compilation), then ``reps`` rounds calling each once in
    turn (CPU): the median milliseconds of each and the result of its last call."""
    for fn in calls.values():
        fn()
    times: Dict[str, List[float]] = {k: [] for k in calls}
    last: Dict[str, object] = {}
    for _ in range(reps):
        for k, fn in calls.items():
            t0 = time.perf_counter()
            last[k] = fn()
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}, last
