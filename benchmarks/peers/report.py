"""The peer benchmark's tables: per setting, each method's time and peak memory as ratios to the
peers' best at the same K, and the check's relative errors."""

from typing import Dict, List, Optional

from .methods import CONTINUOUS, PEER_METHODS

MIB = 2**20
MEM_FLOOR = 1 * MIB
"""Peak memory under this is within the resident set's noise (pages, allocator slack): a memory
ratio is taken against at least this much."""


def _ok(r: Optional[Dict]) -> bool:
    return bool(r) and r.get("status") == "ok"


def best_peers(points: List[Dict], K: int) -> Dict:
    """At K: the fastest peer (name, seconds) and the smallest peak of the peers (name, bytes)."""
    peers = [r for r in points if r["method"] in PEER_METHODS and r["K"] == K and _ok(r)]
    if not peers:
        return {}
    fast = min(peers, key=lambda r: r["time_s"])
    lean = min(peers, key=lambda r: r["peak_bytes"])
    return {"fastest": fast["method"], "time_s": fast["time_s"], "leanest": lean["method"],
            "peak_bytes": lean["peak_bytes"]}


def _ms(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def _short_status(r: Dict) -> str:
    status, err = r.get("status", ""), r.get("error", "")
    if status == "skipped" and "predicted" in err:
        return "skipped (predicted > time-out)"
    if status == "skipped":
        return "skipped (" + err.replace("skipped: ", "") + ")"
    if status == "n/a":
        return "n/a"
    if status == "oom":
        return "over the memory limit"
    if status == "timeout":
        return "over the time-out"
    return status


def ratio_cell(r: Optional[Dict], best: Dict) -> str:
    if r is None:
        return ""
    if not _ok(r):
        return _short_status(r)
    if not best:
        return f"{_ms(r['time_s'])}, {r['peak_bytes'] / MIB:.1f} MiB"
    t = r["time_s"] / best["time_s"]
    m = r["peak_bytes"] / max(best["peak_bytes"], MEM_FLOOR)
    return f"{t:.2f}x / {m:.2g}x"


def ratio_table(setting: Dict) -> str:
    """Rows: methods; columns: K; cells ``time ratio / memory ratio`` to the peers' best."""
    points = setting["points"]
    ks = sorted({r["K"] for r in points})
    methods = list(dict.fromkeys(r["method"] for r in points))
    best = {K: best_peers(points, K) for K in ks}
    by = {(r["method"], r["K"]): r for r in points}
    out = ["| method | " + " | ".join(f"K = {K}" for K in ks) + " |",
           "|---|" + "---|" * len(ks),
           "| *fastest peer* | " + " | ".join(
               f"{best[K]['fastest']} {_ms(best[K]['time_s'])}" if best[K] else "none" for K in ks) + " |",
           "| *smallest peer peak* | " + " | ".join(
               f"{best[K]['leanest']} {best[K]['peak_bytes'] / MIB:.1f} MiB" if best[K] else "none" for K in ks)
           + " |"]
    for m in methods:
        out.append(f"| {m} | " + " | ".join(ratio_cell(by.get((m, K)), best[K]) for K in ks) + " |")
    return "\n".join(out)


def check_cells(setting: Dict) -> str:
    """One line: each method's relative error against unrolled MAML in the check's dtype, flagged
    where an exact method is off by more than ``1e-10`` (the continuous methods approximate the
    gradient flow, not K GD steps: their distance to it is given instead)."""
    check = setting.get("check")
    if not check:
        return "(no correctness check)"
    parts, flagged = [], []
    for m, r in check["methods"].items():
        if r.get("status") != "ok":
            parts.append(f"{m} {r.get('status', '')[:60]}")
            continue
        e = r["rel_vs_maml_unrolled"]
        if m in CONTINUOUS or m.startswith("authors_"):
            parts.append(f"{m} {e:.1e} (flow: {r['rel_vs_flow_f64']:.1e})")
        else:
            parts.append(f"{m} {e:.1e}")
            if not e <= 1e-10:
                flagged.append(m)
    line = (f"Check at K = {check['K']} ({check['dtype']}), relative error against unrolled MAML: "
            + "; ".join(parts) + ".")
    if flagged:
        line += f" FLAGGED (above 1e-10): {', '.join(flagged)}."
    return line


def title(setting: Dict) -> str:
    info = setting["setting"]
    return f"{info['model']}, {info['task']}, {info['tasks']} task(s), d = {info['d']}"
