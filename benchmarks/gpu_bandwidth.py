"""Memory bandwidth of the fused kernels on a GPU, against the device's copy bandwidth and the
same math in plain PyTorch (``amaml_ext.ops.reference``).

    python -m benchmarks.gpu_bandwidth --out gpu_bandwidth.json
    python -m benchmarks.gpu_bandwidth --sizes 1e6,1e7 --ops stage_combine,heun_update
    python -m benchmarks.gpu_bandwidth --device cpu --sizes 1e3 --repeats 3   # checks the script

What it measures (copy, fused and reference times, bytes, GB/s): docs/benchmarks.md, Methods.
Without CUDA it prints "no CUDA device" and exits 0.
"""

import argparse
import math
import platform
import sys
from typing import Callable, Dict, List, Optional

import torch

from .common.kernel_cases import EXTRA, OPS, READS, WRITES, check_agree, fused_call, make_inputs, reference_call
from .common.machine import machine_info
from .common.memory import free_pages_bytes
from .common.results import d_label, write_json
from .common.timing import median_time

DEFAULT_SIZES = "1e5,1e6,1e7,1e8"

# Upper bound on the reference's transient memory, in vectors of d (results + temporaries).
REF_TRANSIENT = {"stage_combine": 4, "dopri5_finish": 10, "dopri5_dense": 16, "heun_update": 3}


def parse_sizes(text: str) -> List[int]:
    sizes = []
    for part in text.split(","):
        part = part.strip()
        if part:
            value = float(part)
            if value < 1 or value != int(value):
                raise argparse.ArgumentTypeError(f"size must be a positive integer, got {part!r}")
            sizes.append(int(value))
    if not sizes:
        raise argparse.ArgumentTypeError("no sizes given")
    return sizes


def parse_ops(text: str) -> List[str]:
    ops = [o.strip() for o in text.split(",") if o.strip()]
    bad = [o for o in ops if o not in OPS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown op(s) {bad}; choose from {list(OPS)}")
    return ops


# ---- timing ------------------------------------------------------------------------------

def copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> Dict:
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), device, repeats=repeats, warmup=3)
    moved = 2 * n * 4
    del src, dst
    return {"bytes": moved, "median_s": t, "GBps": moved / t / 1e9}


def batch(calls: List[Callable[[], object]], count: int) -> Callable[[], None]:
    """``count`` calls, cycling through ``calls`` (one per input set)."""
    seq = [calls[i % len(calls)] for i in range(count)]

    def run():
        for c in seq:
            c()
    return run


def graphed(fn: Callable[[], None], device: torch.device) -> Optional[Callable[[], None]]:
    """``fn`` captured in a CUDA graph (returns its replay), or None where capture fails."""
    if device.type != "cuda":
        return None
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
            fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        torch.cuda.synchronize()
        return g.replay
    except Exception as exc:  # pragma: no cover - depends on the device
        print(f"  (CUDA graph capture failed: {type(exc).__name__}: {exc}; eager timing only)",
              file=sys.stderr)
        return None


# ---- the measurement ---------------------------------------------------------------------

def measure(op: str, d: int, dtype: torch.dtype, device: torch.device, args, l2_bytes: int,
            free_bytes: int) -> Dict:
    esize = torch.empty((), dtype=dtype).element_size()
    bytes_moved = (READS[op] + WRITES[op]) * d * esize
    per_set = (READS[op] + WRITES[op] + EXTRA[op]) * d * esize
    # enough sets that one pass over all of them is several times the L2 cache
    sets = max(1, min(args.max_sets, math.ceil(4 * l2_bytes / per_set)))
    need = sets * per_set + REF_TRANSIENT[op] * d * esize
    row = {"op": op, "d": d, "dtype": str(dtype).replace("torch.", ""), "bytes": bytes_moved,
           "reads": READS[op], "writes": WRITES[op], "sets": sets}
    if need > args.mem_fraction * free_bytes:
        row["skipped"] = f"needs ~{need / 2**30:.1f} GiB, {free_bytes / 2**30:.1f} GiB free"
        return row

    gen = torch.Generator(device="cpu").manual_seed(d)
    xs = [make_inputs(op, d, dtype, device, gen) for _ in range(sets)]
    check_agree(op, xs[0])
    fused = [fused_call(op, x) for x in xs]
    refs = [reference_call(op, x) for x in xs]
    # calls per timed batch: a whole number of rotations, at least --min-calls
    calls = sets * max(1, math.ceil(args.min_calls / sets)) if d <= args.batch_below else sets
    repeats = args.repeats if d < 10 ** 8 else max(5, args.repeats // 4)
    row.update(calls=calls, repeats=repeats)

    for name, fns in (("fused", fused), ("ref", refs)):
        run = batch(fns, calls)
        eager = median_time(run, device, repeats=repeats, warmup=args.warmup) / calls
        row[f"{name}_eager_us"] = eager * 1e6
        replay = graphed(run, device) if not args.no_graph else None
        if replay is not None:
            t = median_time(replay, device, repeats=repeats, warmup=args.warmup) / calls
            row[f"{name}_graph"] = True
        else:
            t = eager
            row[f"{name}_graph"] = False
        row[f"{name}_us"] = t * 1e6
        del replay
    row["GBps"] = bytes_moved / (row["fused_us"] * 1e-6) / 1e9
    row["speedup"] = row["ref_us"] / row["fused_us"]
    row["speedup_eager"] = row["ref_eager_us"] / row["fused_eager_us"]
    del xs, fused, refs
    return row


def markdown(result: Dict) -> str:
    copy = result["copy"]["GBps"]
    lines = [
        f"Device: {result['device_name']}; copy bandwidth (read + write): {copy:.0f} GB/s; "
        f"dtype {result['dtype']}; torch {result['torch']}",
        "",
        "| op | d | sets | MB moved | fused µs | GB/s | % copy | ref µs | speed-up "
        "| fused eager µs | ref eager µs | eager speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        d = d_label(r["d"])
        if "skipped" in r:
            lines.append(f"| {r['op']} | {d} | – | {r['bytes'] / 1e6:.1f} | skipped: {r['skipped']} "
                         "| | | | | | | |")
            continue
        lines.append(
            f"| {r['op']} | {d} | {r['sets']} | {r['bytes'] / 1e6:.1f} | {r['fused_us']:.2f} "
            f"| {r['GBps']:.0f} | {100 * r['GBps'] / copy:.0f}% | {r['ref_us']:.2f} "
            f"| {r['speedup']:.2f}× | {r['fused_eager_us']:.2f} | {r['ref_eager_us']:.2f} "
            f"| {r['speedup_eager']:.2f}× |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_bandwidth", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", metavar="PATH.json", help="write the results as JSON here")
    p.add_argument("--sizes", type=parse_sizes, default=parse_sizes(DEFAULT_SIZES),
                   help=f"comma-separated state sizes d (default {DEFAULT_SIZES})")
    p.add_argument("--ops", type=parse_ops, default=list(OPS), help="comma-separated ops (default: all)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (to test the script)")
    p.add_argument("--repeats", type=int, default=50, help="timed runs per measurement (default 50)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first (default 5)")
    p.add_argument("--min-calls", type=int, default=20,
                   help="op calls per timed run for d <= --batch-below (default 20)")
    p.add_argument("--batch-below", type=float, default=1e6,
                   help="batch several calls per timed run up to this d (default 1e6)")
    p.add_argument("--max-sets", type=int, default=64, help="most input sets to rotate among (default 64)")
    p.add_argument("--copy-mb", type=float, default=1024, help="copy-bandwidth buffer in MB (default 1024)")
    p.add_argument("--mem-fraction", type=float, default=0.8, help="use at most this share of free memory")
    p.add_argument("--no-graph", action="store_true", help="time eager calls only (no CUDA graphs)")
    return p.parse_args(argv)


def device_limits(device: torch.device):
    """(name, L2 bytes, free bytes, total bytes) of the device; on the CPU rough stand-ins."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        props = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        return props.name, int(getattr(props, "L2_cache_size", 0) or 50 * 2**20), free, total
    free = free_pages_bytes()
    return platform.processor() or platform.machine() or "cpu", 32 * 2**20, free, free


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: torch.cuda.is_available() is False; nothing to measure "
              "(use --device cpu to exercise the script on the CPU)")
        if args.out:
            write_json(args.out, {"cuda_available": False, "torch": torch.__version__, "results": []}, indent=2)
        return 0

    dtype = getattr(torch, args.dtype)
    name, l2, free, total = device_limits(device)
    copy_bytes = int(min(args.copy_mb * 1e6, free / 4))
    result = {"cuda_available": torch.cuda.is_available(), "device": str(device),
              "device_name": name, "torch": torch.__version__, "dtype": args.dtype,
              "l2_bytes": l2, "memory_total_bytes": total, "args": {
                  k: v for k, v in vars(args).items() if k not in ("out",)}, "machine": machine_info(device)}
    print(f"{name}: measuring copy bandwidth ({copy_bytes / 1e6:.0f} MB buffer)...", flush=True)
    result["copy"] = copy_bandwidth(device, copy_bytes, repeats=20)
    print(f"  copy: {result['copy']['GBps']:.0f} GB/s (read + write)", flush=True)

    rows = []
    for op in args.ops:
        for d in args.sizes:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                free, _ = torch.cuda.mem_get_info(device)
            row = measure(op, d, dtype, device, args, l2, free)
            rows.append(row)
            if "skipped" in row:
                print(f"  {op:14s} d={d:>10d}: skipped ({row['skipped']})", flush=True)
            else:
                print(f"  {op:14s} d={d:>10d}: fused {row['fused_us']:10.2f} us "
                      f"({row['GBps']:7.1f} GB/s), ref {row['ref_us']:10.2f} us, "
                      f"speed-up {row['speedup']:.2f}x", flush=True)
    result["results"] = rows

    print()
    print(markdown(result))
    if args.out:
        write_json(args.out, result, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
