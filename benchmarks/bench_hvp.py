"""Cost of one Hessian-vector product of the training loss, by implementation.

For the same loss ``f(u)`` of a flat parameter vector ``u`` (the training / support loss that
A-MAML's adjoint differentiates), times one HVP ``H(u) v`` computed by:

* ``double_backward``: ``autograd.grad(f, u, create_graph=True)`` then ``autograd.grad(g, u, v)``,
  the graph rebuilt every call;
* ``fwd_over_rev``: ``torch.func.jvp(torch.func.grad(f), (u,), (v,))``;
* ``rev_over_rev_func``: ``torch.func.vjp(torch.func.grad(f), u)[1](v)``;
* ``linearize_reuse_autograd``: one double-backward linearisation (gradient with its graph, kept
  with ``retain_graph``) per state serving 2 HVPs, as a Heun adjoint step uses it; time per HVP
  (= (linearisation + 2 HVPs) / 2);
* ``linearize_reuse_vjp``: the same with the ``vjp_fn`` of ``torch.func.vjp(grad(f), u)`` applied
  twice;
* ``linearize_reuse_func``: ``torch.func.linearize(torch.func.grad(f), u)`` then its ``jvp_fn``
  applied twice (time per HVP includes the per-state linearisation / tracing);
* ``amaml_hvp_fresh`` / ``amaml_hvp_shared``: ``amaml_ext.functional.TaskFunctions.hvp`` with a
  fresh key every call / the same key for two calls (time per HVP);
* ``compile_double_backward`` / ``compile_fwd_over_rev`` (``--compile-variants``, also
  ``rev_over_rev_func``; none with ``--no-compile``): ``torch.compile`` of that HVP function,
  compiled cold (inductor caches off unless ``--compile-cache``) and timed in a child process,
  skipped with a note when compiling fails or takes longer than ``--compile-timeout`` (60 s);
* ``gradient``: one gradient evaluation, the unit of the ``x grad`` column.

Models (float32, all parameters in one flat vector):

* ``cosmix``: the CosMixture regression MLP 2 -> 32 -> 32 -> 1 (tanh), 100 support points, MSE
  written out as ``((pred - y) ** 2).mean()`` (``--mse functional`` for ``F.mse_loss``, which
  forward-over-reverse cannot differentiate in torch 2.14; the script checks and reports that);
* ``cosmix_b5``: the same for a batch of 5 tasks, ``u`` of shape ``[5, d]``, the forward
  vmapped over tasks (as ``TaskFunctions.losses`` with ``batched=True``), loss summed;
* ``conv4``: 4 x [conv3x3 C channels, BatchNorm2d (training mode), ReLU, MaxPool2d 2] ->
  Linear(C, 20) on 20 random 1x28x28 images (a 20-way 1-shot support set), cross entropy.
  The autograd variants use the module itself; the torch.func variants use a copy passed
  through ``torch.func.replace_all_batch_norm_modules_``; TaskFunctions uses its own copy.

Every variant's result is compared with ``double_backward`` at the same ``(u, v)``
(max |a - b| / max |b|). Times are medians of ``time.perf_counter`` intervals after warm-up;
the in-process variants of a model are timed in interleaved rounds so that load from other
processes hits them alike. A variant slower than ``--slow-call`` per call is timed only
``--slow-repeats`` times. ``torch.func.linearize`` (which has segfaulted) is first tried in a child
process. The machine may be shared, so treat the times as indicative; on an oversubscribed
machine use ``--threads 1`` (with more threads than free cores OpenMP threads wait for each
other and every op can cost a scheduler time slice; the script warns)::

    python benchmarks/bench_hvp.py                       # all models, markdown table
    python benchmarks/bench_hvp.py --threads 1 --out hvp.json
    python benchmarks/bench_hvp.py --models conv4 --channels 64 --no-compile
"""

import argparse
import copy
import json
import os
import platform
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from amaml_ext.functional import TaskFunctions, unflatten_params

MODELS = ("cosmix", "cosmix_b5", "conv4")
REFERENCE = "double_backward"


# -- problems ---------------------------------------------------------------------------------


def mse_explicit(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``F.mse_loss`` written out: identical value, but differentiable forward-over-reverse.

    In torch 2.14 ``jvp(grad(F.mse_loss ...))`` raises "ZeroTensors are immutable" and
    ``torch.func.linearize`` of it crashes the process (pytorch/pytorch#123996: an in-place
    division in ``mse_loss_double_backward`` when the target has no tangent).
    """
    return ((pred - target) ** 2).mean()


def cosmix_loss(args) -> Callable:
    return F.mse_loss if args.mse == "functional" else mse_explicit


def cosmix_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))


def cosmix_task(gen: torch.Generator, n: int = 100, k: int = 3):
    """``n`` points of a random mixture of ``k`` cosines on [-5, 5]^2."""
    x = (torch.rand(n, 2, generator=gen) * 10 - 5)
    w = torch.randn(k, 2, generator=gen)
    phase = torch.rand(k, generator=gen) * 2 * torch.pi
    amp = torch.rand(k, generator=gen) + 0.5
    y = (amp * torch.cos(x @ w.T + phase)).sum(-1, keepdim=True)
    return x, y


def conv4(channels: int, n_way: int = 20, in_channels: int = 1) -> nn.Module:
    layers, c_in = [], in_channels
    for _ in range(4):
        layers += [nn.Conv2d(c_in, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), nn.MaxPool2d(2)]
        c_in = channels
    # 28 -> 14 -> 7 -> 3 -> 1
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels, n_way))


class Problem:
    """A model, its support data and the training loss as a function of a flat ``u``."""

    def __init__(self, name: str, model: nn.Module, loss: Callable, x, y, batched: bool,
                 device: str, seed: int):
        self.name = name
        self.model = model.to(device).train()
        self.fmodel = copy.deepcopy(self.model)
        torch.func.replace_all_batch_norm_modules_(self.fmodel)
        self.loss = loss
        self.x, self.y = x.to(device), y.to(device)
        self.batched = batched
        flat = torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])
        self.d = flat.numel()
        gen = torch.Generator().manual_seed(seed + 1)
        if batched:
            B = x.shape[0]
            u = flat.repeat(B, 1) + 0.1 * torch.randn(B, self.d, generator=gen).to(device)
        else:
            u = flat.clone()
        self.u = u.contiguous()
        self.v = torch.randn(self.u.shape, generator=gen).to(device)
        self.v2 = torch.randn(self.u.shape, generator=gen).to(device)
        self.buffers = dict(self.model.named_buffers())
        self.fbuffers = dict(self.fmodel.named_buffers())

    def _task_loss(self, module, buffers, flat_u, x, y):
        params = unflatten_params(self.model, flat_u)
        pred = torch.func.functional_call(module, (params, buffers), (x,))
        return self.loss(pred, y)

    def _f(self, module, buffers, u):
        if self.batched:
            return torch.func.vmap(lambda uu, xx, yy: self._task_loss(module, buffers, uu, xx, yy))(
                u, self.x, self.y).sum()
        return self._task_loss(module, buffers, u, self.x, self.y)

    def f_autograd(self, u):
        """Training loss (sum over tasks) through the module itself: for the autograd variants."""
        return self._f(self.model, self.buffers, u)

    def f_func(self, u):
        """The same loss through the BatchNorm-stripped copy: for the torch.func variants."""
        return self._f(self.fmodel, self.fbuffers, u)

    def task_functions(self) -> TaskFunctions:
        data = (self.x, self.y)
        return TaskFunctions(self.model, self.loss, data, data, batched=self.batched)


def build_problem(name: str, args, device: str) -> Problem:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    if name == "cosmix":
        x, y = cosmix_task(gen, args.points)
        return Problem(name, cosmix_mlp(), cosmix_loss(args), x, y, False, device, args.seed)
    if name == "cosmix_b5":
        tasks = [cosmix_task(gen, args.points) for _ in range(args.tasks)]
        x = torch.stack([t[0] for t in tasks])
        y = torch.stack([t[1] for t in tasks])
        return Problem(name, cosmix_mlp(), cosmix_loss(args), x, y, True, device, args.seed)
    if name == "conv4":
        x = torch.randn(args.ways, 1, 28, 28, generator=gen)
        y = torch.arange(args.ways)
        return Problem(name, conv4(args.channels, args.ways), F.cross_entropy, x, y, False, device, args.seed)
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


# -- variants ---------------------------------------------------------------------------------
# Each returns (fn, hvps_per_call). fn() returns the HVP results: one tensor (H v), or a tuple
# (H v, H v2) for the variants that serve two vectors from one linearisation.


def hvp_double_backward(p: Problem, u, v):
    with torch.enable_grad():
        leaf = u.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(p.f_autograd(leaf), leaf, create_graph=True)
        (hv,) = torch.autograd.grad(g, leaf, v)
    return hv


def hvp_fwd_over_rev(p: Problem, u, v):
    return torch.func.jvp(torch.func.grad(p.f_func), (u,), (v,))[1]


def hvp_rev_over_rev_func(p: Problem, u, v):
    return torch.func.vjp(torch.func.grad(p.f_func), u)[1](v)[0]


COMPILE_BASES = {"double_backward": hvp_double_backward, "fwd_over_rev": hvp_fwd_over_rev,
                 "rev_over_rev_func": hvp_rev_over_rev_func}


def make_variants(p: Problem) -> Dict[str, Callable]:
    u, v, v2 = p.u, p.v, p.v2
    grad_f = torch.func.grad(p.f_func)

    def gradient():
        with torch.enable_grad():
            leaf = u.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(p.f_autograd(leaf), leaf)
        return g

    def double_backward():
        return hvp_double_backward(p, u, v)

    def fwd_over_rev():
        return hvp_fwd_over_rev(p, u, v)

    def rev_over_rev_func():
        return hvp_rev_over_rev_func(p, u, v)

    def linearize_reuse_autograd():
        with torch.enable_grad():
            leaf = u.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(p.f_autograd(leaf), leaf, create_graph=True)
            (h1,) = torch.autograd.grad(g, leaf, v, retain_graph=True)
            (h2,) = torch.autograd.grad(g, leaf, v2, retain_graph=True)
        return h1, h2

    def linearize_reuse_vjp():
        _, vjp_fn = torch.func.vjp(grad_f, u)
        return vjp_fn(v)[0], vjp_fn(v2)[0]

    def linearize_reuse_func():
        _, jvp_fn = torch.func.linearize(grad_f, u)
        return jvp_fn(v), jvp_fn(v2)

    tf = p.task_functions()
    counter = [0]

    def amaml_hvp_fresh():
        counter[0] += 1
        return tf.hvp(u, v, key=counter[0])

    def amaml_hvp_shared():
        counter[0] += 1
        return tf.hvp(u, v, key=counter[0]), tf.hvp(u, v2, key=counter[0])

    return {
        "gradient": (gradient, 1),
        "double_backward": (double_backward, 1),
        "fwd_over_rev": (fwd_over_rev, 1),
        "rev_over_rev_func": (rev_over_rev_func, 1),
        "linearize_reuse_autograd": (linearize_reuse_autograd, 2),
        "linearize_reuse_vjp": (linearize_reuse_vjp, 2),
        "linearize_reuse_func": (linearize_reuse_func, 2),
        "amaml_hvp_fresh": (amaml_hvp_fresh, 1),
        "amaml_hvp_shared": (amaml_hvp_shared, 2),
    }


NOTES = {
    "gradient": "one gradient (the unit)",
    "double_backward": "graph rebuilt per HVP (reference)",
    "fwd_over_rev": "torch.func jvp(grad)",
    "rev_over_rev_func": "torch.func vjp(grad)",
    "linearize_reuse_autograd": "1 lin. + 2 HVPs per state, per HVP",
    "linearize_reuse_vjp": "1 vjp(grad) + 2 vjp_fn per state, per HVP",
    "linearize_reuse_func": "func.linearize + 2 jvp_fn per state, per HVP",
    "amaml_hvp_fresh": "TaskFunctions.hvp, new key each call",
    "amaml_hvp_shared": "TaskFunctions.hvp, 2 calls per key, per HVP",
    "compile_double_backward": "torch.compile(double-backward HVP)",
    "compile_fwd_over_rev": "torch.compile(jvp(grad))",
    "compile_rev_over_rev_func": "torch.compile(vjp(grad))",
}


# -- measurement ------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def stats(times: List[float]) -> Dict:
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0], times[0], times[0]]
    return {"median_s": statistics.median(times), "q1_s": q[0], "q3_s": q[2], "min_s": min(times),
            "repeats": len(times)}


def measure(fn, per_call: int, args, device: str) -> Dict:
    """Median seconds per HVP of ``fn`` (which computes ``per_call`` of them), after warm-up."""
    return measure_interleaved({"fn": (fn, per_call, args.max_repeats)}, args, device)["fn"]


def measure_interleaved(fns: Dict[str, tuple], args, device: str) -> Dict[str, Dict]:
    """Time several functions in round-robin rounds (rotating the order every round), so that
    load from other processes on a shared machine hits all of them alike.

    ``fns``: name -> (fn, calls_per_repeat, max_repeats). Each function is repeated until it has
    at least ``args.min_repeats`` timings and ``args.min_time`` seconds of them, or ``max_repeats``.
    """
    for fn, _, max_rep in fns.values():
        for _ in range(min(args.warmup, max_rep)):
            fn()
    sync(device)
    times: Dict[str, List[float]] = {n: [] for n in fns}
    spent = dict.fromkeys(fns, 0.0)
    r = 0
    while True:
        active = [n for n, (_, _, max_rep) in fns.items() if len(times[n]) < max_rep
                  and (len(times[n]) < args.min_repeats or spent[n] < args.min_time)]
        if not active:
            break
        k = r % len(active)
        for n in active[k:] + active[:k]:
            fn, per_call, _ = fns[n]
            t0 = time.perf_counter()
            fn()
            sync(device)
            dt = time.perf_counter() - t0
            times[n].append(dt / per_call)
            spent[n] += dt
        r += 1
    return {n: stats(t) for n, t in times.items()}


def rel_diff(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def check(out, refs) -> float:
    outs = out if isinstance(out, tuple) else (out,)
    return max(rel_diff(o, r) for o, r in zip(outs, refs))


# -- child processes: torch.compile (slow, may hang) and probes of transforms that may crash ----


def child_main(args) -> None:
    """Child process: run the jobs ``[[model, job, mse], ...]`` of ``--_child-jobs`` in order,
    printing ``@@RESULT i {json}`` after each (and ``@@START i`` / ``@@COMPILED i`` around a
    compilation, so that the parent can enforce ``--compile-timeout``).

    ``probe_<variant>``: run an in-process variant once and check it (a segfault kills only
    this process). ``compile_<base>``: compile the ``<base>`` HVP function, check it, time it.
    """
    device = args.device
    for i, (model, job, mse) in enumerate(json.loads(args.child_jobs)):
        try:
            args.mse = mse
            p = build_problem(model, args, device)
            refs = (hvp_double_backward(p, p.u, p.v), hvp_double_backward(p, p.u, p.v2))
            if job.startswith("probe_"):
                out = make_variants(p)[job[len("probe_"):]][0]()
                res = {"max_rel_diff": check(out, refs)}
            else:
                base = COMPILE_BASES[job[len("compile_"):]]
                torch._dynamo.reset()
                compiled = torch.compile(lambda u, v: base(p, u, v))
                print(f"@@START {i}", flush=True)
                t0 = time.perf_counter()
                out = compiled(p.u, p.v)
                sync(device)
                compile_s = time.perf_counter() - t0
                print(f"@@COMPILED {i}", flush=True)
                res = {"compile_s": compile_s, "max_rel_diff": check(out, refs)}
                t0 = time.perf_counter()
                compiled(p.u, p.v)
                sync(device)
                slow = time.perf_counter() - t0 > args.slow_call
                fns = {"c": (lambda: compiled(p.u, p.v), 1, args.slow_repeats if slow else args.max_repeats)}
                res.update(measure_interleaved(fns, args, device)["c"])
                if slow:
                    res["slow"] = True
        except Exception as exc:
            res = {"skipped": f"failed: {short_error(exc)}"}
        print(f"@@RESULT {i} {json.dumps(res)}", flush=True)


def short_error(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0][:140] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}"


def _child_once(jobs: List[list], args, timeout: float) -> Tuple[Dict[int, Dict], str]:
    """One child process for ``jobs``: (results by index, why it stopped early or "")."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_child-jobs", json.dumps(jobs),
           "--device", args.device, "--channels", str(args.channels), "--seed", str(args.seed),
           "--points", str(args.points), "--tasks", str(args.tasks), "--ways", str(args.ways),
           "--warmup", str(args.warmup), "--min-repeats", str(args.min_repeats),
           "--max-repeats", str(args.max_repeats), "--min-time", str(args.min_time),
           "--slow-call", str(args.slow_call), "--slow-repeats", str(args.slow_repeats)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    results: Dict[int, Dict] = {}
    stopped = ""
    with tempfile.TemporaryFile("w+") as err:
        # Own session: a timed-out child is ended with its process group (inductor's compile
        # workers included).
        env = dict(os.environ)
        if not args.compile_cache:  # time a cold compile, as a first run sees it
            env["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True,
                                env=env)
        lines: "queue.Queue[Optional[str]]" = queue.Queue()

        def reader():
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=reader, daemon=True).start()
        deadline = time.perf_counter() + timeout
        compile_deadline = None
        while True:
            now = time.perf_counter()
            wait = deadline - now if compile_deadline is None else min(deadline, compile_deadline) - now
            try:
                line = lines.get(timeout=max(wait, 0.01))
            except queue.Empty:
                if compile_deadline is not None and time.perf_counter() >= compile_deadline:
                    stopped = f"skipped: compile took > {args.compile_timeout:.0f} s"
                else:
                    stopped = f"skipped: no result within {timeout:.0f} s"
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
                break
            if line is None:
                proc.wait()
                break
            tag, _, rest = line.strip().partition(" ")
            if tag == "@@START":
                compile_deadline = time.perf_counter() + args.compile_timeout
            elif tag == "@@COMPILED":
                compile_deadline = None
            elif tag == "@@RESULT":
                i, _, payload = rest.partition(" ")
                results[int(i)] = json.loads(payload)
        if not stopped and len(results) < len(jobs):
            if proc.returncode < 0:
                try:
                    stopped = f"failed: process killed by {signal.Signals(-proc.returncode).name}"
                except ValueError:
                    stopped = f"failed: process killed by signal {-proc.returncode}"
            else:
                err.seek(0)
                tail = [ln for ln in err.read().strip().splitlines() if ln.strip()]
                stopped = f"failed: {tail[-1][:160] if tail else f'exit code {proc.returncode}'}"
    return results, stopped


def run_jobs(jobs: List[list], args, timeout_per_job: float) -> List[Dict]:
    """Run ``jobs`` in child processes: when one dies (crash, timeout), the job it was on is
    marked skipped and the rest go on in a fresh child."""
    out: List[Optional[Dict]] = [None] * len(jobs)
    todo = list(range(len(jobs)))
    while todo:
        results, stopped = _child_once([jobs[i] for i in todo], args, timeout_per_job * len(todo))
        for k, i in enumerate(todo):
            if k in results:
                out[i] = results[k]
        done = len(results)
        if done < len(todo):
            out[todo[done]] = {"skipped": stopped or "failed: no result"}
            done += 1
        todo = todo[done:]
    return out


# -- driver -----------------------------------------------------------------------------------


# torch.func.linearize traces with make_fx; it has segfaulted (F.mse_loss, torch 2.14), so it is
# tried once in a child process before it runs in this one.
CRASH_PRONE = ("linearize_reuse_func",)


def row_line(r: Dict) -> str:
    return f"  {r['model']:10s} {r['variant']:26s} " + (f"{r['median_s'] * 1e3:9.3f} ms" if "median_s" in r
                                                         else r["skipped"])


def bench_model(name: str, args, device: str, probes: Dict[str, Dict]) -> List[Dict]:
    """All in-process variants on one model; ``probes``: variant -> child-process probe result."""
    t_model = time.perf_counter()
    p = build_problem(name, args, device)
    refs = (hvp_double_backward(p, p.u, p.v), hvp_double_backward(p, p.u, p.v2))
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
        try:
            out = fn()  # also the first warm-up call (it includes one-time set-up costs)
            row["max_rel_diff"] = rel_diff(out, grad_ref) if variant == "gradient" else check(out, refs)
            t0 = time.perf_counter()
            fn()
            second = time.perf_counter() - t0
        except Exception as exc:  # a torch.func transform that does not support this model
            row["skipped"] = f"failed: {short_error(exc)}"
            continue
        slow = second > args.slow_call
        if slow:
            row["note"] += f"; slow: {args.slow_repeats} repeats"
        timed[variant] = (fn, per_call, args.slow_repeats if slow else args.max_repeats)
    for variant, res in measure_interleaved(timed, args, device).items():
        rows[variant].update(res)
    if "linearize_reuse_func" in timed:  # what the traced linearisation costs once it exists
        _, jvp_fn = torch.func.linearize(torch.func.grad(p.f_func), p.u)
        apply = measure(lambda: jvp_fn(p.v), 1, args, device)
        rows["linearize_reuse_func"]["apply_only_median_s"] = apply["median_s"]
        rows["linearize_reuse_func"]["note"] += f"; jvp_fn alone {apply['median_s'] * 1e3:.3g} ms"
    for r in rows.values():
        print(row_line(r), file=sys.stderr, flush=True)
    print(f"  {name}: {time.perf_counter() - t_model:.1f} s", file=sys.stderr, flush=True)
    return list(rows.values())


def markdown(rows: List[Dict]) -> str:
    head = ("| model | d | variant | ms / HVP (median) | IQR (ms) | x grad | repeats | max rel diff | note |\n"
            "|---|---:|---|---:|---:|---:|---:|---:|---|")
    lines = [head]
    for r in rows:
        d = f"{r['batch']}x{r['d']}" if r["batch"] > 1 else str(r["d"])
        if "median_s" in r:
            lines.append(f"| {r['model']} | {d} | {r['variant']} | {r['median_s'] * 1e3:.3f} | "
                         f"{r['q1_s'] * 1e3:.3f}-{r['q3_s'] * 1e3:.3f} | {r.get('x_grad', float('nan')):.2f} | {r['repeats']} | "
                         f"{r['max_rel_diff']:.1e} | {r['note']} |")
        else:
            lines.append(f"| {r['model']} | {d} | {r['variant']} | - | - | - | - | - | {r['skipped']} |")
    return "\n".join(lines)


def summary(rows: List[Dict], tol: float) -> str:
    """Per model: the fastest agreeing variant overall, without torch.compile, and among the
    one-HVP-per-state (no reuse) eager variants."""
    def fmt(r):
        return f"{r['variant']} {r['median_s'] * 1e3:.3f} ms ({r.get('x_grad', float('nan')):.2f} x grad)"

    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        hvps = [r for r in rows if r["model"] == model and r["variant"] != "gradient" and "median_s" in r
                and r["max_rel_diff"] <= tol]
        eager = [r for r in hvps if not r["variant"].startswith("compile_")]
        single = [r for r in eager if r["hvps_per_state"] == 1 and not r["variant"].startswith("amaml")]
        if not single:
            continue
        worst = max(r["max_rel_diff"] for r in rows if r["model"] == model and "max_rel_diff" in r)
        out.append(f"- {model}: fastest {fmt(min(hvps, key=lambda r: r['median_s']))}; "
                   f"fastest eager {fmt(min(eager, key=lambda r: r['median_s']))}; "
                   f"fastest eager without reuse {fmt(min(single, key=lambda r: r['median_s']))}; "
                   f"largest rel diff vs {REFERENCE} {worst:.1e}")
    return "\n".join(out)


def environment(args) -> Dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = ""
    env = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(),
           "loadavg_1m": round(os.getloadavg()[0], 2), "device": args.device, "machine": platform.machine(), "git": commit}
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--channels", type=int, default=32, help="Conv4 channels (default 32)")
    ap.add_argument("--ways", type=int, default=20, help="Conv4 classes = support images (default 20)")
    ap.add_argument("--points", type=int, default=100, help="CosMixture support points per task (default 100)")
    ap.add_argument("--tasks", type=int, default=5, help="tasks in cosmix_b5 (default 5)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--min-repeats", type=int, default=20)
    ap.add_argument("--max-repeats", type=int, default=2000)
    ap.add_argument("--min-time", type=float, default=0.4, help="seconds of timed calls per variant, at least")
    ap.add_argument("--slow-call", type=float, default=0.25,
                    help="a variant whose second call takes longer (s) is timed only --slow-repeats times")
    ap.add_argument("--slow-repeats", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    ap.add_argument("--compile-timeout", type=float, default=60.0,
                    help="give up on a torch.compile variant whose first call (the compile) takes longer")
    ap.add_argument("--compile-variants", nargs="+", default=["double_backward", "fwd_over_rev"],
                    choices=sorted(COMPILE_BASES), help="HVP functions to torch.compile")
    ap.add_argument("--compile-cache", action="store_true",
                    help="let torch.compile use its on-disk caches (default: disabled, cold compile times)")
    ap.add_argument("--mse", default="explicit", choices=("explicit", "functional"),
                    help="CosMixture loss: ((pred - y) ** 2).mean() (default) or F.mse_loss, with which "
                         "forward-over-reverse fails in torch 2.14")
    ap.add_argument("--no-mse-check", action="store_true",
                    help="skip checking fwd_over_rev / linearize with F.mse_loss on cosmix (child process)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=1e-4, help="max rel diff for a variant to count as agreeing")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--_child-jobs", dest="child_jobs", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    if args.child_jobs:
        child_main(args)
        return
    t0 = time.perf_counter()

    # Probes in child processes: the crash-prone transforms on every model, then (last, since
    # linearize segfaults there) the forward-mode variants with F.mse_loss itself.
    jobs = [[m, "probe_" + v, args.mse] for m in args.models for v in CRASH_PRONE]
    mse_check = (args.mse == "explicit" and not args.no_mse_check
                 and any(m.startswith("cosmix") for m in args.models))
    if mse_check:
        jobs += [["cosmix", "probe_fwd_over_rev", "functional"], ["cosmix", "probe_linearize_reuse_func", "functional"]]
    probe_res = run_jobs(jobs, args, timeout_per_job=60)
    print(f"  probes: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    probes: Dict[str, Dict[str, Dict]] = {m: {} for m in args.models}
    compat = {}
    for (m, job, mse), res in zip(jobs, probe_res):
        if mse == args.mse:
            probes[m][job[len("probe_"):]] = res
        else:
            compat[job[len("probe_"):]] = res.get("skipped") or f"ok (max rel diff {res['max_rel_diff']:.1e})"

    by_model = {m: bench_model(m, args, args.device, probes[m]) for m in args.models}

    if not args.no_compile:
        t1 = time.perf_counter()
        jobs = [[m, "compile_" + v, args.mse] for m in args.models for v in args.compile_variants]
        for (m, v, _), res in zip(jobs, run_jobs(jobs, args, timeout_per_job=args.compile_timeout + 60)):
            d, batch = by_model[m][0]["d"], by_model[m][0]["batch"]
            row = {"model": m, "d": d, "batch": batch, "variant": v, "hvps_per_state": 1, "note": NOTES[v]}
            if "skipped" in res:
                res["skipped"] = res["skipped"].replace("failed:", "skipped: compile failed:", 1)
            row.update(res)
            if "compile_s" in row:
                row["note"] += f"; compile {row['compile_s']:.1f} s, timed in a child process"
            if row.pop("slow", False):
                row["note"] += f"; slow: {args.slow_repeats} repeats"
            by_model[m].append(row)
            print(row_line(row), file=sys.stderr, flush=True)
        print(f"  compile: {time.perf_counter() - t1:.1f} s", file=sys.stderr, flush=True)

    rows = [r for m in args.models for r in by_model[m]]
    for m in args.models:
        grad_t = next((r["median_s"] for r in by_model[m] if r["variant"] == "gradient" and "median_s" in r), None)
        for r in by_model[m]:
            if "median_s" in r and grad_t:
                r["x_grad"] = r["median_s"] / grad_t
    env = environment(args)
    print(f"HVP of the training loss, {args.device}, torch {env['torch']}, {env['threads']} threads "
          f"({env['cpu_count']} CPUs, 1-min load average {env['loadavg_1m']}); "
          f"median over >= {args.min_repeats} repeats / {args.min_time} s after {args.warmup} warm-up calls, "
          f"in-process variants interleaved round-robin; "
          f"max rel diff = max|Hv - Hv_{REFERENCE}| / max|Hv_{REFERENCE}|\n")
    if env["loadavg_1m"] + env["threads"] > (env["cpu_count"] or 1) + 0.5 and env["threads"] > 1:
        print(f"WARNING: {env['threads']} threads on {env['cpu_count']} CPUs with a load average of "
              f"{env['loadavg_1m']}: the machine is oversubscribed; OpenMP threads then wait for each other "
              f"and every op can take a scheduler time slice. Compare with --threads 1.\n")
    print(markdown(rows))
    print()
    print(summary(rows, args.tol))
    if compat:
        print(f"\ncosmix losses use mse_explicit, ((pred - y) ** 2).mean(); with F.mse_loss instead: "
              + "; ".join(f"{k}: {v}" for k, v in compat.items()) + " (pytorch/pytorch#123996)")
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"environment": env, "args": {k: v for k, v in vars(args).items() if not k.startswith("child_")},
                       "results": rows, "f_mse_loss_check": compat or None}, fh, indent=2)


if __name__ == "__main__":
    main()
