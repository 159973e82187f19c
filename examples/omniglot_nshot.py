"""The data pipeline and the log of ``higher_maml_omniglot.py`` and its port: higher's
``OmniglotNShot`` interface (``support/omniglot_loaders.py`` in higher's examples) over
:class:`amaml_ext.data.images.Omniglot`, and the JSON log with the run's peak memory.

``db.next(mode)`` gives ``x_spt [B, N*K, 1, 28, 28]``, ``y_spt [B, N*K]``, ``x_qry [B, N*Q, 1,
28, 28]``, ``y_qry [B, N*Q]`` as higher's loader does. The tasks are seeded
(:class:`~amaml_ext.data.images.EpisodePool`): training batch ``j`` holds episodes ``j*B ..
(j+1)*B - 1`` of the train split; ``test_batches`` fixed batches of the test split are cycled,
so every evaluation sees the same tasks. Two scripts built with the same arguments and seed see
the same episodes in the same order.

Differences from higher's loader: the images are amaml_ext's (Lanczos-resized to 28 px, strokes
1, background 0; the classes are characters x 4 rotations; MAML's seeded split of 1,200
training characters), not a cached ``omniglot.npy``; the draws come from a ``torch.Generator``.

Run ``python examples/omniglot_nshot.py plot A.json B.json ... OUT.png [--smooth N]`` to draw the accuracy
curves of several logs in one figure and print their last accuracies, peak memory and the
largest difference of each log's curves from the first's.
"""

import json
import os
import resource
import sys
import time

import torch

from amaml_ext.data.images import EpisodePool


class OmniglotNShot:
    """``batchsz`` tasks per ``next()``: ``n_way``-way ``k_shot``-shot, ``k_query`` query images
    per class. ``dataset`` is an :class:`amaml_ext.data.images.Omniglot` (or any
    :class:`~amaml_ext.data.images.FewShotImages` with "train" and "test" splits)."""

    def __init__(self, dataset, batchsz, n_way, k_shot, k_query, device="cpu", seed=0, test_batches=4,
                 dtype=torch.float32):
        self.batchsz, self.device, self.dtype = batchsz, device, dtype
        self.n_way, self.k_shot, self.k_query = n_way, k_shot, k_query
        kw = dict(ways=n_way, shots=k_shot, query_shots=k_query)
        self.pools = {"train": EpisodePool(dataset, "train", seed=seed, **kw),
                      "test": EpisodePool(dataset, "test", size=test_batches * batchsz, seed=seed + 1, **kw)}
        self.batches = {"train": len(self.pools["train"]) // batchsz, "test": test_batches}
        self.cursor = {"train": 0, "test": 0}

    def next(self, mode="train"):
        """The next batch of ``mode`` (``"train"`` or ``"test"``): x_spt, y_spt, x_qry, y_qry."""
        j = self.cursor[mode] % self.batches[mode]
        self.cursor[mode] += 1
        first = j * self.batchsz
        b = self.pools[mode].batch(torch.arange(first, first + self.batchsz), device=self.device, dtype=self.dtype)
        return b.support[0], b.support[1], b.query[0], b.query[1]


# ----------------------------------------------------------------------------------------------
# the log


_BASELINE = {}


def reset_peak_memory() -> bool:
    """Reset the process's resident high-water mark (Linux: ``5 > /proc/self/clear_refs``), so
    that :func:`peak_memory` reports the peak from now on, and note the resident memory now (the
    baseline: torch, the images); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    _BASELINE["rss_at_reset_mib"] = _status("VmRSS")
    return True


def _status(field):
    """A ``/proc/self/status`` field in MiB, or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_memory() -> dict:
    """The process's peak resident memory in MiB: ``vm_hwm`` (since the last
    :func:`reset_peak_memory`, Linux only, else None), the resident memory at that reset and
    ``ru_maxrss`` (since the start)."""
    return {"vm_hwm_mib": _status("VmHWM"), **_BASELINE,
            "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def dump(log, path, **info):
    """Write the log (a list of dicts) and ``info`` to ``path`` as JSON, with the peak memory
    and the process's CPU time so far (written after every epoch: a run stopped early keeps what
    it did)."""
    if not path:
        return
    head = {"info": info, "memory": peak_memory(), "cpu_s": time.process_time()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:            # one log entry a line
        f.write(json.dumps(head)[:-1] + ', "log": [\n' + ",\n".join(json.dumps(r) for r in log) + "\n]}\n")
    os.replace(tmp, path)


def _load(path):
    with open(path) as f:
        return json.load(f)


def curves(run):
    """``{mode: (steps, accuracies)}`` of a log (modes ``train``, ``valid``, ``test``)."""
    out = {}
    for r in run["log"]:
        steps, accs = out.setdefault(r["mode"], ([], []))
        steps.append(r["step"])
        accs.append(r["acc"])
    return out


def compare(paths):
    """Per mode, each log's last accuracy and the largest difference of two logs' accuracies at
    the same step (the first log against each other one), as text lines."""
    runs = [_load(p) for p in paths]
    lines = []
    for run, path in zip(runs, paths):
        mem = run["memory"]
        last = {m: round(a[-1], 2) for m, (_, a) in curves(run).items()}
        lines.append(f"{run['info'].get('label', path)}: last accuracy {last}; peak RSS {mem['vm_hwm_mib']:.0f} MiB "
                     f"(at the start of training {mem.get('rss_at_reset_mib', float('nan')):.0f}), "
                     f"CPU {run['cpu_s']:.0f} s")
    base = {(r["mode"], r["step"]): r for r in runs[0]["log"]}
    for run in runs[1:]:
        for mode in sorted({r["mode"] for r in run["log"]}):
            pairs = [(r, base[mode, r["step"]]) for r in run["log"] if r["mode"] == mode and (mode, r["step"]) in base]
            if pairs:
                acc = [abs(r["acc"] - q["acc"]) for r, q in pairs]
                loss = max(abs(r["loss"] - q["loss"]) for r, q in pairs)
                lines.append(f"{mode}: max |accuracy difference| {max(acc):.4f} points over {len(acc)} steps "
                             f"({sum(d > 0 for d in acc)} differ); max |loss difference| {loss:.3g}")
    return lines


def _smooth(values, window):
    """The mean of the last ``window`` values at each position (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot(paths, out, title="MAML on Omniglot 5-way 1-shot", smooth=1):
    """One figure: train and validation accuracy per meta-step (thin lines; the mean of the last
    ``smooth`` steps) and test accuracy (markers) of each log in ``paths``, labelled by the log's
    ``info["label"]``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, path in enumerate(paths):
        run = _load(path)
        label = run["info"].get("label", os.path.basename(path))
        ls = "-" if k == 0 else "--"
        for mode, (steps, accs) in curves(run).items():
            if mode == "test" and len(steps) > 1:
                ax.plot(steps, accs, color=f"C{k}", ls=ls, marker="o", ms=4, label=f"{label}: test")
            elif mode == "test":
                ax.plot(steps, accs, color=f"C{k}", ls="", marker="*" if k == 0 else "x", ms=10, label=f"{label}: test")
            else:
                what = f"{mode}, mean of {smooth} steps" if smooth > 1 else mode
                ax.plot(steps, _smooth(accs, smooth), color=f"C{k + 2 * (mode == 'valid')}", ls=ls, lw=0.9,
                        alpha=0.7, label=f"{label}: {what}")
    ax.set_xlabel("meta-step")
    ax.set_ylabel("query accuracy (%)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="draw and compare the logs' accuracy curves")
    ap.add_argument("command", choices=["plot"])
    ap.add_argument("logs", nargs="+")
    ap.add_argument("out", help="the PNG to write")
    ap.add_argument("--smooth", type=int, default=1, help="train/valid curves: mean of this many steps")
    ap.add_argument("--title", default="MAML on Omniglot 5-way 1-shot")
    a = ap.parse_args()
    plot(a.logs, a.out, a.title, a.smooth)
    print("\n".join(compare(a.logs)))
