"""One (method, K) point of the sweep, in a fresh process: the child measures time, peak memory
and the floor; the parent watches it (set-up time-out, time-out, memory limit) and reads its
``READY`` and ``RESULT {json}`` lines."""

import gc
import json
import statistics
import time
from typing import Dict, List, Optional

import torch

from amaml_ext.functional import TaskFunctions

from ..common.children import Child, module_command
from ..common.memory import maxrss_bytes, proc_status_bytes, reset_peak_rss, trim_heap
from ..common.results import jsonable
from ..common.timing import median_call_time, sync
from ..peers.methods import prewarm_k
from .methods import COMPILED, METHODS, OURS
from .problem import MetaGradProblem, build_problem


def unit_costs(p: MetaGradProblem, device, compile: bool = False) -> Dict[str, float]:
    """Seconds per TaskFunctions call: grad, HVP at a new state, HVP reusing the state (with
    ``compile``: the compiled callbacks, whose HVPs do not reuse a state: new = reuse)."""
    fns = TaskFunctions(p.model, p.loss, p.support, p.query, p.batched, compile=compile)
    u = p.u0
    v = torch.randn_like(u)
    try:
        t_grad = median_call_time(lambda: fns.grad(u), device)
        t_new = median_call_time(lambda: fns.hvp(u, v, row=None), device)
        fns.hvp(u, v, row=0)
        t_reuse = median_call_time(lambda: fns.hvp(u, v, row=0), device)
    finally:
        fns.release()
    return {"t_grad": t_grad, "t_hvp_new": t_new, "t_hvp_reuse": t_reuse}


def floor_seconds(stats: Dict, costs: Dict[str, float]) -> Optional[float]:
    """The method's own derivative calls priced at single calls: ``grad_evals * t_grad +
    linearisations * t_hvp_new + (hvps - linearisations) * t_hvp_reuse``."""
    try:
        g, hv, lin = int(stats["grad_evals"]), int(stats["hvps"]), int(stats["linearisations"])
    except (KeyError, TypeError, ValueError):
        return None
    return g * costs["t_grad"] + lin * costs["t_hvp_new"] + (hv - lin) * costs["t_hvp_reuse"]


def _warm_library(p: MetaGradProblem) -> None:
    """One gradient and one HVP of the support loss, so that no method pays torch's first calls."""
    with torch.enable_grad():
        leaf = p.u0.requires_grad_(True)
        (g,) = torch.autograd.grad(p.train_loss(leaf), leaf, create_graph=True)
        torch.autograd.grad(g, leaf, torch.ones_like(g))


def _timed_runs(fn, p: MetaGradProblem, K: int, args) -> Dict:
    """One warm-up meta-gradient, then up to ``--repeats`` timed ones that fit in ``--timeout``."""
    start = time.perf_counter()
    t0, c0 = time.perf_counter(), time.process_time()
    grad, stats = fn(p, K)
    sync(args.device)
    warm, warm_cpu = time.perf_counter() - t0, time.process_time() - c0
    if not bool(torch.isfinite(grad).all()):
        raise FloatingPointError("non-finite meta-gradient")
    del grad
    left = args.timeout - (time.perf_counter() - start)
    n = min(args.repeats, int(left / warm) if warm > 0 else args.repeats)
    times, cpu = [], []
    for _ in range(max(n, 0)):
        t0, c0 = time.perf_counter(), time.process_time()
        grad, stats = fn(p, K)
        sync(args.device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        del grad
    # cpu_time_s: this process's CPU time (all its threads); with one torch thread on a loaded
    # machine it is the steadier of the two clocks
    return dict(time_s=statistics.median(times) if times else warm, warmup_s=warm, times_s=times,
                cpu_time_s=statistics.median(cpu) if cpu else warm_cpu, cpu_times_s=cpu,
                warmup_only=not times, stats=jsonable(stats))


def run_single(args) -> Dict:
    """The child's side: build the problem, warm up (and compile), reset the memory baseline,
    print ``READY``, time the method and read its peak memory."""
    method, K = args.single[0], int(args.single[1])
    device = args.device
    p = build_problem(args)
    _warm_library(p)
    fn = METHODS[method]
    out: Dict = {"method": method, "K": K}
    # compile (inductor's own memory included) / a peer's or learner's first call (set-up,
    # compilation) outside the measurement
    first_k = 1 if method in COMPILED else prewarm_k(method, K)
    if first_k:
        t0 = time.perf_counter()
        try:
            fn(p, first_k)
        except Exception as e:  # noqa: BLE001
            return dict(out, status="error", error=f"{type(e).__name__}: {str(e)[:300]}")
        out["compile_s" if method in COMPILED else "first_call_s"] = time.perf_counter() - t0
    gc.collect()
    trim_heap()
    sync(device)
    is_cuda = torch.device(device).type == "cuda"
    base_maxrss = maxrss_bytes()
    hwm_reset = False
    if is_cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        hwm_reset = reset_peak_rss()
        base = proc_status_bytes("VmRSS") if hwm_reset else base_maxrss
    print("READY", flush=True)
    try:
        out.update(_timed_runs(fn, p, K, args))
        if is_cuda:
            peak, how = torch.cuda.max_memory_allocated() - base, "cuda.max_memory_allocated"
        elif hwm_reset:
            peak, how = proc_status_bytes("VmHWM") - base, "VmHWM (reset at baseline) - VmRSS at baseline"
        else:
            peak, how = maxrss_bytes() - base, "ru_maxrss - baseline ru_maxrss"
        out.update(status="ok", peak_bytes=int(peak), peak_method=how,
                   peak_maxrss_bytes=int(maxrss_bytes() - base_maxrss), baseline_bytes=int(base))
    except (torch.cuda.OutOfMemoryError, MemoryError) as e:
        return dict(out, status="oom", error=f"{type(e).__name__}: {str(e)[:300]}")
    except Exception as e:  # noqa: BLE001  (a benchmark reports failures, it does not stop on them)
        return dict(out, status="error", error=f"{type(e).__name__}: {str(e)[:300]}")
    if method in OURS:
        try:
            costs = unit_costs(p, device, compile=method in COMPILED)
            out["unit_costs"] = costs
            fl = floor_seconds(out["stats"], costs)
            if fl:
                out["floor_s"] = fl
                out["total_over_floor"] = out["time_s"] / fl
        except Exception as e:  # noqa: BLE001
            out["floor_error"] = f"{type(e).__name__}: {e}"
    return out


def child_command(args, method: str, K: int) -> List[str]:
    cmd = module_command(
        "benchmarks.meta_grad", "--single", method, str(K), "--model", args.model, "--device", args.device,
        "--dtype", args.dtype, "--h", repr(args.h), "--repeats", str(args.repeats), "--timeout", repr(args.timeout),
        "--channels", str(args.channels), "--query-shots", str(args.query_shots), "--seed", str(args.seed),
        "--rtol", repr(args.rtol), "--atol", repr(args.atol), "--tasks", str(args.tasks))
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.jacobian_vectorize:
        cmd.append("--jacobian-vectorize")
    return cmd


def run_point(args, method: str, K: int) -> Dict:
    """The parent's side: run one point in a child; kill it past ``--setup-timeout`` before
    ``READY``, past ``--timeout`` after it, or above ``--mem-limit`` GiB resident (CPU)."""
    child = Child(child_command(args, method, K))
    launched = time.perf_counter()
    ready_at = result = killed = None
    mem_limit = args.mem_limit * (1 << 30)
    on_cpu = torch.device(args.device).type == "cpu"
    while True:
        line = child.next_line(timeout=0.05)
        if line is None:
            break
        if line.startswith("READY"):
            ready_at = time.perf_counter()
        elif line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
        now = time.perf_counter()
        if killed is None:
            if ready_at is None and now - launched > args.setup_timeout:
                killed = "error: set-up time-out"
            elif ready_at is not None and now - ready_at > args.timeout:
                killed = "timeout"
            elif on_cpu and (proc_status_bytes("VmRSS", child.pid) or 0) > mem_limit:
                killed = f"oom: resident memory > --mem-limit {args.mem_limit:g} GiB"
            if killed is not None:
                child.kill()
    rc = child.wait()
    if result is not None:
        return result
    if killed is not None:
        return {"method": method, "K": K, "status": killed.split(":")[0], "error": killed,
                "elapsed_s": time.perf_counter() - (ready_at or launched)}
    tail = "".join(child.err_tail).strip().splitlines()[-3:]
    return {"method": method, "K": K, "status": "error", "error": f"child exited with {rc}: " + " | ".join(tail)}
