"""The in-process measurement of the HVP variants on one model: each checked once, then all
timed together in interleaved rounds (``common.timing.measure_interleaved``)."""

import sys
import time
from typing import Dict, List

import torch

from ..common.results import short_error
from ..common.timing import measure_interleaved
from .problem import build_problem
from .report import row_line
from .variants import NOTES, check, make_variants, references, rel_diff


def interleaved(fns: Dict[str, tuple], args, device: str) -> Dict[str, Dict]:
    """:func:`measure_interleaved` with the command's warm-up and repeat options."""
    return measure_interleaved(fns, device, args.warmup, args.min_repeats, args.min_time)


def _first_calls(fn, variant: str, refs, grad_ref, row: Dict, args):
    """Call a variant twice (the first call, with its one-time set-up, is also its check); the
    most repeats to time it with (fewer for a slow variant), or None with ``row["skipped"]`` set."""
    try:
        out = fn()
        row["max_rel_diff"] = rel_diff(out, grad_ref) if variant == "gradient" else check(out, refs)
        t0 = time.perf_counter()
        fn()
        second = time.perf_counter() - t0
    except Exception as exc:  # a torch.func transform that does not support this model
        row["skipped"] = f"failed: {short_error(exc)}"
        return None
    slow = second > args.slow_call
    if slow:
        row["note"] += f"; slow: {args.slow_repeats} repeats"
    return args.slow_repeats if slow else args.max_repeats


def bench_model(name: str, args, device: str, probes: Dict[str, Dict]) -> List[Dict]:
    """All in-process variants on one model; ``probes``: variant -> child-process probe result."""
    t_model = time.perf_counter()
    p = build_problem(name, args, device)
    refs = references(p)
    grad_ref = torch.func.grad(p.f_func)(p.u)
    batch = p.u.shape[0] if p.batched else 1
    rows: Dict[str, Dict] = {}
    timed: Dict[str, tuple] = {}
    for variant, (fn, per_call) in make_variants(p).items():
        row = rows[variant] = {"model": name, "d": p.d, "batch": batch, "variant": variant,
                               "hvps_per_state": per_call, "note": NOTES[variant]}
        if "skipped" in probes.get(variant, {}):
            row["skipped"] = probes[variant]["skipped"]
            continue
        max_repeats = _first_calls(fn, variant, refs, grad_ref, row, args)
        if max_repeats is not None:
            timed[variant] = (fn, per_call, max_repeats)
    for variant, res in interleaved(timed, args, device).items():
        rows[variant].update(res)
    if "linearize_reuse_func" in timed:  # what the traced linearisation costs once it exists
        _, jvp_fn = torch.func.linearize(torch.func.grad(p.f_func), p.u)
        apply = interleaved({"fn": (lambda: jvp_fn(p.v), 1, args.max_repeats)}, args, device)["fn"]
        rows["linearize_reuse_func"]["apply_only_median_s"] = apply["median_s"]
        rows["linearize_reuse_func"]["note"] += f"; jvp_fn alone {apply['median_s'] * 1e3:.3g} ms"
    for r in rows.values():
        print(row_line(r), file=sys.stderr, flush=True)
    print(f"  {name}: {time.perf_counter() - t_model:.1f} s", file=sys.stderr, flush=True)
    return list(rows.values())
