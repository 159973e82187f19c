"""The entry point: ``train``, ``evaluate`` and ``compare``."""

import json
import os
import sys
import time
from typing import Dict, Optional, Sequence

from ..accuracy import AdjointAccuracyError
from ..data.benchmarks import BENCHMARKS
from ..train import THETA, DistributedError, RunConfigMismatch, RunFileError, init_distributed, launched_by_torchrun, load_checkpoint
from .options import build_parser, device_of, resolve_task_args
from .report import compare_plot, compare_table, paired_table
from .runs import RunProblem, evaluate_run, run_config, train_one


def compare(args) -> Dict:
    os.makedirs(args.out, exist_ok=True)
    curves = {}
    for method in args.methods:
        run = os.path.join(args.out, method)
        ck = load_checkpoint(run)
        done = os.path.exists(os.path.join(run, THETA)) and ck is not None and ck["step"] >= args.meta_steps
        t0 = time.perf_counter()
        if not done:
            if ck is not None and not args.quiet:
                print(f"{method}: continuing the run in {run} from meta-step {ck['step']}")
            try:
                train_one(args, method, run, resume=True)
            except RunConfigMismatch as e:
                raise SystemExit(f"amaml-ext compare: {e}; use another --out") from None
        elif not args.quiet:
            print(f"{method}: already trained in {run}")
        rows = (load_checkpoint(run) or {}).get("metrics", [])
        curve = evaluate_run(run, args.test_steps, args.device, quiet=args.quiet, data_root=args.data_root,
                             distributed=args.distributed)
        curve["train_seconds"] = sum(r["seconds"] for r in rows)
        curve["wall_seconds_this_call"] = time.perf_counter() - t0
        curves[method] = curve
    if args.distributed is not None and not args.distributed.is_main:
        return curves                # rank 0 writes the table and the plot
    what = args.setting
    if BENCHMARKS[args.task].episodes:
        prob = RunProblem(run_config(args, args.methods[0]), args.device, args.data_root)
        what = f"{prob.train_pool.ways}-way {prob.train_pool.shots}-shot"
    n_test = next(iter(curves.values()))["test_tasks"]
    title = (f"{args.task}, {what}: {args.meta_steps} meta-steps, inner {args.inner_steps} steps "
             f"(MAML {args.maml_steps}), {n_test} test tasks")
    plot_title = (f"{args.task} {what}, {args.meta_steps} meta-steps\n"
                  f"inner {args.inner_steps} GD steps (MAML {args.maml_steps}, MAML-1 1), {n_test} test tasks")
    compare_plot(curves, os.path.join(args.out, "compare.png"), plot_title)
    table = compare_table(curves)
    paired = paired_table(curves)
    if paired:
        table += ("\n\nPaired per-task differences at the last step (the same test tasks for every method):\n\n"
                  + paired)
    with open(os.path.join(args.out, "compare.md"), "w") as f:
        measure = BENCHMARKS[args.task].measure
        f.write(f"# {title}\n\n{measure} after meta-test GD steps (step {args.inner_lr:g}); last column: "
                f"meta-training seconds.\n\n{table}\n")
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump({"args": {k: (v if isinstance(v, (int, float, str, list, bool, type(None))) else str(v))
                            for k, v in vars(args).items()}, "curves": curves}, f, indent=1)
    print(f"\n{title}\n\n{table}\n\nwrote {os.path.join(args.out, 'compare.png')}, compare.md, compare.json")
    return curves


# ---- entry point --------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.distributed = _join_torchrun(args)
    try:
        code = _main(args)
        if args.distributed is not None:
            args.distributed.barrier("the end of the command")   # no rank tears the group down under another
        return code
    except RunFileError as e:
        raise SystemExit(f"amaml-ext: {e}") from None
    finally:
        if args.distributed is not None:
            import torch.distributed
            torch.distributed.destroy_process_group()


def _join_torchrun(args):
    """Under torchrun (its environment names a rank): join the process group (gloo on the CPU,
    nccl with --device cuda, which becomes cuda:LOCAL_RANK); ranks other than 0 are quiet."""
    if not launched_by_torchrun():
        return None
    group = init_distributed(args.device or "cpu", timeout=args.dist_timeout, tasks_per_call=args.tasks_per_call)
    if args.device and group.device.type == "cuda":
        args.device = str(group.device)
    if not group.is_main:
        args.quiet = True
    return group


def _main(args) -> int:
    if args.command == "evaluate":
        evaluate_run(args.run, args.test_steps, device_of(args.device) if args.device else None, args.quiet,
                     distributed=args.distributed)
        return 0
    args.device = device_of(args.device)
    resolve_task_args(args)
    try:
        if args.command == "train":
            if not args.resume and args.distributed is None and load_checkpoint(args.out) is not None:
                raise SystemExit(f"amaml-ext: argument --out: {args.out!r} already holds a run; add --resume "
                                 f"to continue it or choose another directory")
            train_one(args, args.method, args.out, args.resume)
            if args.distributed is None or args.distributed.is_main:
                print(f"wrote {os.path.join(args.out, THETA)}")
        else:
            compare(args)
    except (RunConfigMismatch, AdjointAccuracyError, FloatingPointError, FileExistsError, DistributedError) as e:
        raise SystemExit(f"amaml-ext: {e}") from None
    except KeyboardInterrupt as e:
        print(f"\namaml-ext: {e or 'interrupted'}", file=sys.stderr)
        return 143 if "SIGTERM" in str(e) else 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
