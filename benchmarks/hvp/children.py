"""What the HVP benchmark runs in child processes: ``torch.compile`` (slow, may hang) and probes
of the transforms that may crash. The parent sends jobs ``[[model, job, mse], ...]`` with the
hidden option ``--_child-jobs``; the child prints ``@@RESULT i {json}`` after each job (and
``@@START i`` / ``@@COMPILED i`` around a compilation, so that the parent can enforce
``--compile-timeout``)."""

import json
import os
import time
from typing import Dict, List, Optional, Tuple

import torch

from ..common.children import Child, module_command
from ..common.results import short_error
from ..common.timing import call_time, measure_interleaved, sync
from .problem import build_problem
from .variants import COMPILE_BASES, check, make_variants, references

# Options a child takes over from the parent (the problem and the timing).
PASSED_ON = ("device", "channels", "seed", "points", "tasks", "ways", "warmup", "min_repeats", "max_repeats",
             "min_time", "slow_call", "slow_repeats")


def _compile_job(i: int, p, base: str, refs, args) -> Dict:
    """Compile the ``base`` HVP function, check it, time it."""
    fn = COMPILE_BASES[base]
    torch._dynamo.reset()
    compiled = torch.compile(lambda u, v: fn(p, u, v))
    print(f"@@START {i}", flush=True)
    t0 = time.perf_counter()
    out = compiled(p.u, p.v)
    sync(args.device)
    compile_s = time.perf_counter() - t0
    print(f"@@COMPILED {i}", flush=True)
    res = {"compile_s": compile_s, "max_rel_diff": check(out, refs)}
    slow = call_time(lambda: compiled(p.u, p.v), args.device) > args.slow_call
    fns = {"c": (lambda: compiled(p.u, p.v), 1, args.slow_repeats if slow else args.max_repeats)}
    res.update(measure_interleaved(fns, args.device, args.warmup, args.min_repeats, args.min_time)["c"])
    if slow:
        res["slow"] = True
    return res


def child_main(args) -> None:
    """The child's side: run the jobs of ``--_child-jobs`` in order. ``probe_<variant>``: run an
    in-process variant once and check it (a segfault kills only this process);
    ``compile_<base>``: :func:`_compile_job`."""
    for i, (model, job, mse) in enumerate(json.loads(args.child_jobs)):
        try:
            args.mse = mse
            p = build_problem(model, args, args.device)
            refs = references(p)
            if job.startswith("probe_"):
                out = make_variants(p)[job[len("probe_"):]][0]()
                res = {"max_rel_diff": check(out, refs)}
            else:
                res = _compile_job(i, p, job[len("compile_"):], refs, args)
        except Exception as exc:
            res = {"skipped": f"failed: {short_error(exc)}"}
        print(f"@@RESULT {i} {json.dumps(res)}", flush=True)


def _child_command(jobs: List[list], args) -> List[str]:
    cmd = module_command("benchmarks.hvp", "--_child-jobs", json.dumps(jobs))
    for name in PASSED_ON:
        cmd += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return cmd


def _child_once(jobs: List[list], args, timeout: float) -> Tuple[Dict[int, Dict], str]:
    """One child process for ``jobs``: (results by index, why it stopped early or "")."""
    env = dict(os.environ)
    if not args.compile_cache:  # time a cold compile, as a first run sees it
        env["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"
    # Own session: a timed-out child is ended with its process group (inductor's workers included).
    child = Child(_child_command(jobs, args), env=env, own_session=True)
    results: Dict[int, Dict] = {}
    stopped = ""
    deadline = time.perf_counter() + timeout
    compile_deadline: Optional[float] = None
    while True:
        wait = (deadline if compile_deadline is None else min(deadline, compile_deadline)) - time.perf_counter()
        line = child.next_line(timeout=max(wait, 0.01))
        if line == "":
            if compile_deadline is not None and time.perf_counter() >= compile_deadline:
                stopped = f"skipped: compile took > {args.compile_timeout:.0f} s"
            else:
                stopped = f"skipped: no result within {timeout:.0f} s"
            child.kill()
            break
        if line is None:
            break
        tag, _, rest = line.strip().partition(" ")
        if tag == "@@START":
            compile_deadline = time.perf_counter() + args.compile_timeout
        elif tag == "@@COMPILED":
            compile_deadline = None
        elif tag == "@@RESULT":
            i, _, payload = rest.partition(" ")
            results[int(i)] = json.loads(payload)
    child.wait()
    if not stopped and len(results) < len(jobs):
        signame = child.killed_by()
        if signame:
            stopped = f"failed: process killed by {signame}"
        else:
            tail = child.stderr_lines()
            stopped = f"failed: {tail[-1][:160] if tail else f'exit code {child.proc.returncode}'}"
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
