"""The meta-gradient benchmark's output: the header, a progress line per point, the results
table and the notes under it (unit costs, how peak memory was read)."""

import statistics
from typing import Dict, List

import torch


def header(p, args) -> str:
    info = p.info
    return (f"Meta-gradient vs inner steps K: {info['model']}, {info['task']}, support {info['support']}, "
            f"query {info['query']}, d = {p.d}, {info['tasks']} task(s) per meta-gradient; "
            f"{args.device}, {args.dtype}, "
            f"{args.threads or torch.get_num_threads()} threads; h = {args.h:g}, T = K h")


def progress_line(r: Dict) -> str:
    return (f"  {r['method']:17s} K={r['K']:<5d} {r['status']:8s} "
            + (f"{r['time_s']:.4g} s, {r['peak_bytes'] / 2**20:.1f} MiB" if r["status"] == "ok"
               else r.get("error", "")))


def _fmt_time(r):
    if r.get("status") != "ok":
        return ""
    s = f"{r['time_s']:.4g}"
    return s + ("*" if r.get("warmup_only") else "")


def _fmt_mem(r):
    if r.get("status") != "ok" or r.get("peak_bytes") is None:
        return ""
    return f"{r['peak_bytes'] / 2**20:.1f}"


def _status(r: Dict, st: Dict) -> str:
    status = r.get("status", "")
    if status != "ok":
        status = r.get("error", status)
    elif st.get("rejected_steps"):
        status = f"ok ({st.get('accepted_steps')} acc. / {st.get('rejected_steps')} rej. dopri5 steps)"
    elif st.get("accepted_steps") is not None and st.get("solver") == "dopri5":
        status = f"ok ({st.get('accepted_steps')} dopri5 steps)"
    return status.replace("|", "/")


def results_table(points: List[Dict]) -> str:
    out = ["| method | K | time (s) | peak mem (MiB) | grad evals | HVPs | linearisations | stored states (MiB) "
           "| floor (s) | total/floor | status |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in points:
        st = r.get("stats") or {}
        traj = st.get("trajectory_bytes")
        evals = st.get("grad_evals", "")
        if "nfe_forward" in st:
            evals = f"{st['nfe_forward']} fwd + {st['nfe_backward']} bwd NFE"
        hv = st.get("hvps", st.get("hessians", ""))
        if "hessians" in st:
            hv = f"{st['hessians']} dense Hessians"
        out.append(" | ".join([
            f"| {r['method']}", str(r["K"]), _fmt_time(r), _fmt_mem(r), str(evals), str(hv),
            str(st.get("linearisations", "")), f"{traj / 2**20:.2f}" if traj is not None else "",
            f"{r['floor_s']:.4g}" if r.get("floor_s") else "",
            f"{r['total_over_floor']:.2f}" if r.get("total_over_floor") else "", _status(r, st)]) + " |")
    return "\n".join(out)


def notes(points: List[Dict], repeats: int) -> List[str]:
    """The lines under the table: median unit costs of the ours points, how peak memory was read."""
    out = []
    costs = [r["unit_costs"] for r in points if r.get("unit_costs")]
    if costs:
        med = {k: statistics.median(c[k] for c in costs) for k in costs[0]}
        out.append(f"\nUnit costs (median over the ours points): grad {med['t_grad'] * 1e3:.3f} ms, "
                   f"HVP at a new state {med['t_hvp_new'] * 1e3:.3f} ms, HVP reusing the state "
                   f"{med['t_hvp_reuse'] * 1e3:.3f} ms. Times: median of up to {repeats} runs after a warm-up "
                   f"(* = warm-up only).")
    hows = sorted({r["peak_method"] for r in points if r.get("peak_method")})
    if hows:
        out.append(f"Peak memory: {'; '.join(hows)}.")
    return out
