"""Markdown summary of benchmark JSON files.

    python -m benchmarks.summarize bench_cpu.json [bench_gpu.json ...]

Reads the ``--benchmark-json`` output of pytest-benchmark for ``benchmarks/`` (CPU or GPU run:
rows are split by device) and prints

* kernels: fused vs reference median per (op, d, device), their ratio, and the fused op's
  effective bandwidth (bytes a single pass must move / median time);
* dopri5: ours vs torchdiffeq per (case, device): median time, f evaluations, accepted
  (rejected) steps, time per accepted step, max |ours - torchdiffeq| on the grid, max error
  against the exact solution.

A JSON written by ``python -m benchmarks.gpu_bandwidth --out`` is recognised too and printed as
its table.
"""

import json
import math
import os
import sys

from .common.results import d_label

OP_ORDER = ["stage_combine", "dopri5_finish", "dopri5_dense", "heun_update"]
CASE_ORDER = ["appendixA", "linear-1e4", "linear-1e6"]
DEVICE_ORDER = ["cpu", "cuda"]


def fmt_time(seconds):
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "–"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
        if seconds >= scale or unit == "ns":
            value = seconds / scale
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return str(seconds)


def order(value, ordering):
    return (ordering.index(value), "") if value in ordering else (len(ordering), str(value))


def machine_line(data):
    m = data.get("machine_info", {})
    amaml = m.get("amaml", {})
    parts = []
    cpu = m.get("cpu", {})
    if isinstance(cpu, dict) and cpu.get("brand_raw"):
        parts.append(cpu["brand_raw"])
    if amaml.get("cpu_count"):
        parts.append(f"{amaml['cpu_count']} CPUs, torch threads {amaml.get('torch_threads')}")
    if amaml.get("gpu"):
        parts.append(f"GPU {amaml['gpu']}")
    if amaml.get("torch"):
        parts.append(f"torch {amaml['torch']}")
    if amaml.get("torchdiffeq"):
        parts.append(f"torchdiffeq {amaml['torchdiffeq']}")
    when = data.get("datetime")
    if when:
        parts.append(when[:19])
    return "; ".join(parts)


def rows_of_kind(benchmarks, kind, key, variant):
    """``{key(extra_info): {extra_info[variant]: (stats, extra_info)}}`` over the benchmarks whose
    ``extra_info["kind"]`` is ``kind``."""
    rows = {}
    for b in benchmarks:
        x = b.get("extra_info", {})
        if x.get("kind") == kind:
            rows.setdefault(key(x), {})[x[variant]] = (b["stats"], x)
    return rows


def kernel_table(benchmarks):
    pairs = rows_of_kind(benchmarks, "kernel", lambda x: (x["op"], x["device"], x["d"]), "impl")
    if not pairs:
        return None
    lines = ["| op | device | d | fused median | reference median | reference / fused "
             "| fused GB/s | fused IQR |",
             "|---|---|---|---|---|---|---|---|"]
    for key in sorted(pairs, key=lambda k: (order(k[0], OP_ORDER), order(k[1], DEVICE_ORDER), k[2])):
        op, device, d = key
        fused = pairs[key].get("fused")
        ref = pairs[key].get("reference")
        fm = fused[0]["median"] if fused else None
        rm = ref[0]["median"] if ref else None
        ratio = f"{rm / fm:.2f}×" if fm and rm else "–"
        if fm and rm and rm < fm:
            ratio += " (fused slower)"
        gbps = f"{fused[1]['bytes'] / fm / 1e9:.1f}" if fused and fm and "bytes" in fused[1] else "–"
        iqr = fmt_time(fused[0]["iqr"]) if fused else "–"
        lines.append(f"| {op} | {device} | {d_label(d)} | {fmt_time(fm)} | {fmt_time(rm)} | {ratio} "
                     f"| {gbps} | {iqr} |")
    return "\n".join(lines)


def dopri5_table(benchmarks):
    rows = rows_of_kind(benchmarks, "dopri5", lambda x: (x["case"], x["device"]), "solver")
    if not rows:
        return None
    lines = ["| case | device | solver | median | vs amaml | nfe | accepted (rejected) steps "
             "| time / accepted step | max \\|ours − torchdiffeq\\| | max err vs exact |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(rows, key=lambda k: (order(k[0], CASE_ORDER), order(k[1], DEVICE_ORDER))):
        case, device = key
        ours = rows[key].get("amaml")
        base = ours[0]["median"] if ours else None
        for solver in ("amaml", "torchdiffeq"):
            if solver not in rows[key]:
                continue
            stats, x = rows[key][solver]
            med = stats["median"]
            rel = f"{med / base:.2f}×" if base else "–"
            acc = x.get("accepted_steps")
            per_step = med / acc if acc else None
            lines.append(
                f"| {case} (d={d_label(x.get('d', 1))}, h={x.get('h')}) | {device} | {solver} "
                f"| {fmt_time(med)} | {rel} | {x.get('nfe', '–')} | {acc} ({x.get('rejected_steps', '–')}) "
                f"| {fmt_time(per_step)} | {x.get('max_abs_diff', float('nan')):.2e} "
                f"| {x.get('max_abs_err', float('nan')):.2e} |")
    return "\n".join(lines)


def summarize(path):
    with open(path) as fh:
        data = json.load(fh)
    out = [f"## {os.path.basename(path)}", ""]
    if "copy" in data and "results" in data:  # gpu_bandwidth output
        from .gpu_bandwidth import markdown
        out.append(markdown(data))
        return "\n".join(out)
    if "results" in data and "benchmarks" not in data:
        out.append("no results (no CUDA device when it ran)" if not data.get("cuda_available", True)
                   else "no results")
        return "\n".join(out)
    benchmarks = data.get("benchmarks", [])
    line = machine_line(data)
    if line:
        out += [line, ""]
    kt = kernel_table(benchmarks)
    if kt:
        out += ["### Fused kernels vs plain torch (float32, fused ops write into preallocated outputs)",
                "", kt, ""]
    dt = dopri5_table(benchmarks)
    if dt:
        out += ["### DOPRI5 solve: amaml_ext vs torchdiffeq (float64, rtol=1e-6, atol=1e-8)", "", dt, ""]
    if not kt and not dt:
        out.append("no benchmark rows recognised")
    return "\n".join(out)


def main(argv):
    if not argv:
        print(__doc__.strip().split("\n\n")[1])
        return 2
    print("\n\n".join(summarize(p) for p in argv))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
