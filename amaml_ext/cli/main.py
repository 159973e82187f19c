"""The entry point: ``train``, ``evaluate`` and ``compare``."""

import json
import os
import sys
import time
from typing import Dict, Optional, Sequence

from ..metagrad.accuracy import AdjointAccuracyError
from ..train.benchmarks import BENCHMARKS
from ..train import (CHECKPOINT, THETA, DistributedError, RunConfigMismatch, RunFileError, init_distributed,
                     launched_by_torchrun, load_checkpoint)
from ..train.io import atomic_write_bytes, check_resumable
from ..train.loop import RESUME_HINT, run_settings
from .checks import (CommandError, check_environment, check_methods, ending, given_options, unused_options,
                     warn_unused)
from .options import build_parser, device_of, resolve_task_args
from .report import compare_plot, compare_table, paired_table
from .runs import RunProblem, evaluate_run, locked, run_config, train_one

COMPARE_FILES = ("compare.png", "compare.md", "compare.json")


def compare(args) -> Dict:
    """Train (or continue) every method into ``OUT/<method>``, meta-test each, write the table and
    the plot. Runs made with other settings, or past --meta-steps, are refused up front (they
    would be reported under settings they were not trained with); the directories are locked."""
    runs = {m: os.path.join(args.out, m) for m in args.methods}
    done = _runs_done(args, runs)
    check_methods(args, {m: done[m] is None for m in runs})
    warn_unused(args)
    curves = {}
    with locked([args.out, *runs.values()], args.distributed, writable=(args.out, COMPARE_FILES)):
        for method, run in runs.items():
            curves[method] = _compare_one(args, method, run, done[method])
        if args.distributed is None or args.distributed.is_main:      # rank 0 writes the table and the plot
            _write_report(args, curves)
    return curves


def _runs_done(args, runs: Dict[str, str]) -> Dict[str, Optional[int]]:
    """The meta-steps each run of ``compare`` has done (None: no checkpoint yet), once its
    settings are checked to be these and its steps at most --meta-steps."""
    tasks_per_call = 1 if args.distributed is None else args.distributed.tasks_per_call
    done = {}
    for method, run in runs.items():
        ck = load_checkpoint(run)
        if ck is not None:
            settings = run_settings(run_config(args, method), meta_batch=args.meta_batch, lr=args.lr, seed=args.seed,
                                    tasks_per_call=tasks_per_call, clip_grad_norm=args.clip_grad_norm)
            try:
                check_resumable(run, settings, args.meta_steps, ck)
            except RunConfigMismatch as e:
                raise CommandError(f"amaml-ext compare: {e}; compare would report it under these settings: run "
                                   f"again with its settings, or use another --out") from None
        done[method] = None if ck is None else int(ck["step"])
    return done


def _compare_one(args, method: str, run: str, done: Optional[int]) -> Dict:
    """``method``'s run trained (or continued) unless it is finished; its meta-test curve."""
    finished = done is not None and done >= args.meta_steps and os.path.exists(os.path.join(run, THETA))
    t0 = time.perf_counter()
    if not finished:
        if done is not None and not args.quiet:
            print(f"{method}: continuing the run in {run} from meta-step {done}")
        try:
            train_one(args, method, run, resume=True)
        except RunConfigMismatch as e:
            raise CommandError(f"amaml-ext compare: {e}; use another --out") from None
    elif not args.quiet:
        print(f"{method}: already trained in {run}")
    rows = (load_checkpoint(run) or {}).get("metrics", [])
    curve = evaluate_run(run, args.test_steps, args.device, quiet=args.quiet, data_root=args.data_root,
                         distributed=args.distributed)
    curve["train_seconds"] = sum(r["seconds"] for r in rows)
    curve["wall_seconds_this_call"] = time.perf_counter() - t0
    return curve


def _write_report(args, curves: Dict[str, Dict]) -> None:
    """compare.png, compare.md and compare.json (atomically), and the table on stdout."""
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
    measure = BENCHMARKS[args.task].measure
    atomic_write_bytes(os.path.join(args.out, "compare.md"),
                       (f"# {title}\n\n{measure} after meta-test GD steps (step {args.inner_lr:g}); last column: "
                        f"meta-training seconds.\n\n{table}\n").encode())
    saved = {k: (v if isinstance(v, (int, float, str, list, bool, type(None))) else str(v)) for k, v in vars(args).items()}
    atomic_write_bytes(os.path.join(args.out, "compare.json"),
                       json.dumps({"args": saved, "curves": curves}, indent=1).encode())
    print(f"\n{title}\n\n{table}\n\nwrote {os.path.join(args.out, 'compare.png')}, compare.md, compare.json")


def _train(args) -> None:
    """``train``: the options checked (and a fresh run's first step made) before the run
    directory is locked and written."""
    if not args.resume and args.distributed is None and load_checkpoint(args.out) is not None:
        raise CommandError(f"amaml-ext: argument --out: {args.out!r} already holds a run; add --resume "
                           f"to continue it or choose another directory")
    check_methods(args, {args.method: not (args.resume and os.path.exists(os.path.join(args.out, CHECKPOINT)))})
    warn_unused(args)
    with locked([args.out], args.distributed):
        train_one(args, args.method, args.out, args.resume)
    if args.distributed is None or args.distributed.is_main:
        print(f"wrote {os.path.join(args.out, THETA)}")


# ---- entry point --------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command; an error ends it with a one-line message and exit status 2 for a refusal
    (an option, a run directory), 1 for a run that failed (:func:`~amaml_ext.cli.checks.ending`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.given = given_options(parser, sys.argv[1:] if argv is None else list(argv))
    args.distributed = _join_torchrun(args)
    try:
        code = _main(args)
        if args.distributed is not None:
            args.distributed.barrier("the end of the command")   # no rank tears the group down under another
        return code
    except (RunFileError, SystemExit) as e:
        raise ending(e) from None
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
    check_environment()
    if args.command == "evaluate":
        try:
            evaluate_run(args.run, args.test_steps, device_of(args.device) if args.device else None, args.quiet,
                         distributed=args.distributed)
        except FloatingPointError as e:       # the meta-test diverged (InnerLoopDiverged): a failed run
            raise CommandError(f"amaml-ext evaluate --run {args.run}: {e}", 1) from None
        except ValueError as e:               # a non-finite theta.pt, damaged data: a refusal
            raise CommandError(f"amaml-ext evaluate --run {args.run}: {e}") from None
        return 0
    args.device = device_of(args.device)
    resolve_task_args(args)
    args.unused = unused_options(args, args.given)
    try:
        if args.command == "train":
            _train(args)
        else:
            compare(args)
    except (RunConfigMismatch, FileExistsError) as e:
        raise CommandError(f"amaml-ext: {e}") from None
    except (AdjointAccuracyError, FloatingPointError, DistributedError) as e:
        raise CommandError(f"amaml-ext: {e}", 1) from None
    except KeyboardInterrupt as e:
        hint = ("run the same command again to continue" if args.command == "compare"
                else "run the same command with --resume to continue")
        print(f"\namaml-ext: {str(e).replace(RESUME_HINT, hint) or 'interrupted'}", file=sys.stderr)
        return 143 if "SIGTERM" in str(e) else 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
