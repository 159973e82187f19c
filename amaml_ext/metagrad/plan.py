"""The plan of one meta-gradient: the grid, the phases of per-task horizons, and the memory mode
with its checkpoint segments."""

import math
import numbers
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from .. import ode
from .options import MEMORY_MODES, MetaGradOptions  # noqa: F401  (MEMORY_MODES re-exported)
from .revolve import plan_for


@dataclass
class Plan:
    """``n`` grid intervals of ``h`` up to ``T`` (``times [n+1]``); ``phases`` ``[(a, b, mask)]``:
    grid ranges with a constant set of active tasks (``mask [rows, 1]``, None when all are);
    ``memory`` ``"store"`` or ``"checkpoint"`` with segments of ``m`` intervals; states
    ``[rows, d]`` seen by the callbacks as ``shape``."""

    n: int
    h: float
    T: float
    times: torch.Tensor
    phases: List[Tuple[int, int, Optional[torch.Tensor]]]
    memory: str
    m: int
    shape: List[int]
    rows: int
    max_steps: int
    state_bytes: int
    budget: int = 0
    keep: bool = False
    slots: int = 0


def horizons(T, h: float, batched: bool, batch: int) -> Tuple[float, Optional[torch.Tensor]]:
    """T_max and, for per-task horizons, a [B] float64 tensor of T_b (validated)."""
    if isinstance(T, torch.Tensor) and T.numel() > 1:
        if not batched:
            raise ValueError(f"argument 'T' must be a number unless batched=True, got a tensor of shape {tuple(T.shape)}")
        if T.shape != (batch,):
            raise ValueError(f"argument 'T' must be a number or a tensor of shape [B] = [{batch}], got {tuple(T.shape)}")
        Tv = T.detach().to("cpu", torch.float64)
        if T.dtype != torch.float64:
            # a float32 (or lower) horizon is the nearest representable value: snap it to the grid
            # when it is within that precision of a whole number of steps
            steps = torch.round(Tv / h)
            close = (steps * h - Tv).abs() <= 4 * torch.finfo(T.dtype).eps * Tv.abs().clamp_min(1.0)
            Tv = torch.where(close & (steps >= 1), steps * h, Tv)
        if not bool(torch.isfinite(Tv).all()) or bool((Tv <= 0).any()):
            raise ValueError(f"argument 'T' must be finite and > 0 for every task, got {Tv.tolist()}")
        for b, tb in enumerate(Tv.tolist()):
            try:
                ode.grid_size(tb, h)
            except ValueError as e:
                raise ValueError(f"argument 'T' (task {b}): {e}") from None
        T_max = float(Tv.max())
        return T_max, (Tv if bool((Tv < T_max).any()) else None)
    if isinstance(T, torch.Tensor):
        if T.numel() != 1:
            raise ValueError(f"argument 'T' must be a number or a tensor [B], got a tensor of shape {tuple(T.shape)}")
        low = T.dtype != torch.float64 and T.is_floating_point()
        T = T.detach().item()
        if low and isinstance(h, float) and h > 0 and round(T / h) >= 1 and abs(round(T / h) * h - T) <= 1e-6 * max(1.0, abs(T)):
            T = round(T / h) * h
    if isinstance(T, bool) or not isinstance(T, numbers.Real):
        raise TypeError(f"argument 'T' must be a number or a tensor [B], got {type(T).__name__}")
    return float(T), None


def default_budget(device: torch.device) -> int:
    """The default ``memory_budget``: half the free memory of a CUDA device, a quarter of the RAM
    on the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.5 * free)
    try:
        return int(0.25 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def _physical_memory() -> Optional[int]:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def _check_size(n: int, T: float, h: float, state_bytes: int, memory: str, device: torch.device) -> None:
    """Refuse a grid that cannot be held: its times (8 bytes a step) or, with ``memory="store"``,
    its states past the machine's memory (the device's for CUDA)."""
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else _physical_memory()
    need = 8 * (n + 1) + ((n + 1) * state_bytes if memory == "store" else 0)
    if total is not None and need > total:
        fix = " or memory='checkpoint' (about 2 sqrt(N) states)" if memory == "store" else ""
        raise ValueError(f"arguments 'T' and 'h': T / h = {n:,} grid steps (T={T:g}, h={h:g}) need "
                         f"{need / 2**30:,.1f} GiB ({'the states and ' if memory == 'store' else ''}the grid times), "
                         f"more than the {total / 2**30:,.1f} GiB of {device.type} memory: use a larger h{fix}")


def make_plan(u0: torch.Tensor, T, options: MetaGradOptions, batch: int) -> Plan:
    """The plan for the start state ``u0`` (``[d]`` or ``[B, d]``): ``T / h -> N`` is made here
    (and per task, for per-task horizons) and nowhere else."""
    h, mem = options.solver.h, options.memory
    T_max, per_task_T = horizons(T, h, options.batched, batch)
    n = ode.grid_size(T_max, h)
    state_bytes = u0.numel() * u0.element_size()
    _check_size(n, T_max, h, state_bytes, "store" if mem.memory == "linearise" else mem.memory, u0.device)
    memory = mem.memory
    budget = default_budget(u0.device) if mem.memory_budget is None else int(mem.memory_budget)
    if memory == "auto":
        memory = "store" if (n + 1) * state_bytes <= budget else "checkpoint"
    # linearisations kept where the forward's evaluations are the adjoint's states (the Forward
    # decides how many fit, once it has measured one)
    keep = (mem.memory in ("auto", "linearise") and memory != "checkpoint"
            and options.forward_scheme.grid_stages)
    spans = phases(per_task_T, n, h, u0)
    m, slots = segment_length(n), 0
    if memory == "checkpoint" and not options.forward_scheme.adaptive:
        m, slots = checkpoint_layout(spans, n, budget, state_bytes)
    return Plan(n=n, h=h, T=T_max, times=ode.grid_times(T_max, n), phases=spans,
                memory="store" if memory == "linearise" else memory, m=m, shape=list(u0.shape),
                rows=batch if options.batched else 1, max_steps=options.solver.steps_budget(n),
                state_bytes=state_bytes, budget=budget, keep=keep, slots=slots)


def checkpoint_layout(spans, n: int, budget: int, state_bytes: int) -> Tuple[int, int]:
    """``(m, slots)`` of a fixed-step checkpointed forward: segments of about sqrt(N) intervals,
    every bottom state kept (``slots = 0``), where that fits ``budget``; else the segment length
    and the number of snapshots of the binomial schedule (:mod:`.revolve`) that recompute the
    fewest grid steps within it. A budget below any layout keeps the sqrt(N) one."""
    def count(mm: int) -> Tuple[int, int]:
        segs = [s for a, b, _ in spans for s in segments(a, b, mm)]
        return len(segs), max(e - c for c, e in segs)
    m = segment_length(n)
    n_seg, longest = count(m)
    if (n_seg + longest + 2) * state_bytes <= budget:
        return m, 0
    try:
        rp = plan_for(n, budget // state_bytes - 1, count=count)
    except ValueError:
        return m, 0
    return rp.m, rp.slots


def phases(per_task_T: Optional[torch.Tensor], n: int, h: float, like: torch.Tensor):
    """Grid ranges ``[(a, b, mask)]`` in which the set of active tasks is constant. Without
    per-task horizons there is one phase ``[0, N]``. A task with horizon T_b is active in the
    phases before row T_b / h and frozen (f = 0, vjp = 0) after it; splitting the run there keeps
    the right-hand side smooth inside every solve (an RK step never straddles T_b)."""
    if per_task_T is None:
        return [(0, n, None)]
    stops = sorted({ode.grid_size(tb, h) for tb in per_task_T.tolist()} | {n})
    horizon_rows = torch.tensor([ode.grid_size(tb, h) for tb in per_task_T.tolist()])
    out, a = [], 0
    for b in stops:
        mask = (horizon_rows > a).to(device=like.device, dtype=like.dtype).unsqueeze(1)
        out.append((a, b, mask))
        a = b
    return out


def segment_length(n: int) -> int:
    """Grid intervals per checkpoint segment: about sqrt(N), even (RK4 adjoint pairs)."""
    m = max(2, int(math.ceil(math.sqrt(n))))
    return m + (m % 2)


def segments(a: int, b: int, m: int):
    """Segments [(c, e)] covering rows a..b, top first, m intervals each except the top one,
    which absorbs the remainder. The RK4 adjoint pairs intervals from the top of each solve and
    takes its odd-N step (which needs >= 3 intervals) at the top, so with this layout a
    checkpointed adjoint makes exactly the steps of the stored one."""
    n = b - a
    top = n % m or m
    if top < 3 and n - top >= m:
        top += m
    bounds, e = [], b
    c = max(a, e - top)
    bounds.append((c, e))
    e = c
    while e > a:
        c = max(a, e - m)
        bounds.append((c, e))
        e = c
    return bounds
