"""The options the CPU cost benchmarks share (``--reps``, ``--threads``, ``--quick``, ``--out``)."""

import argparse
import warnings

import torch


def cost_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=15, help="timed rounds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="MLP settings only")
    p.add_argument("--out", default=None, help="JSON file for the results")
    return p


def parse(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse, set the thread count, silence the warnings the settings provoke on purpose."""
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    return args
