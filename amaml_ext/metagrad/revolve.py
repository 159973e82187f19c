"""Binomial ("Revolve") checkpointing of a fixed-step forward: the schedule of Griewank & Walther
(Algorithm 799, ACM TOMS 26, 2000) that reverses ``n`` steps with ``s`` snapshot slots and the
fewest recomputed steps, and :class:`RevolveCheckpoints`, which hands a backward pass the state at
the bottom of each checkpoint segment, top segment first, keeping at most ``s`` states.

A *step* here is one checkpoint segment (``m`` grid intervals); step ``i`` (``0 <= i < n``, in
forward order) goes from state ``x_i`` to ``x_{i+1}``. The backward reverses the steps last first:
reversing step ``i`` needs ``x_i``. With ``s`` slots (the slot of ``x_0`` included) the fewest
advances, the first forward sweep's ``n - 1`` included, is

    ``t(n, s) = r n - beta(s + 1, r - 1)``  for  ``beta(s, r - 1) < n <= beta(s, r)``,

``beta(s, r) = C(s + r, s)`` being the most steps ``s`` slots reverse with each step advanced at
most ``r`` times. The schedule splits a range of ``n`` steps at ``k`` (advance ``k`` steps, take a
snapshot there, reverse the upper part with one slot fewer, restore, reverse the lower part), with
``k = max(1, n - beta(s - 1, r), beta(s, r - 2))``: an optimal split (its two parts fill their
binomial ranges), so making the whole schedule costs O(n r) and it attains ``t(n, s)``.
"""

import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .._checks import integer

ADVANCE, SNAPSHOT, RESTORE, FREE, REVERSE = "advance", "snapshot", "restore", "free", "reverse"
Action = Tuple[str, int, int]   # (kind, i, j): advance x_i -> x_j; others (kind, i, i)


def beta(s: int, r: int) -> int:
    """``C(s + r, s)``: the most steps ``s`` snapshot slots reverse with at most ``r`` advances of
    each step (0 for ``r < 0``)."""
    return math.comb(s + r, s) if r >= 0 and s >= 0 else 0


def repetitions(n: int, s: int) -> int:
    """The smallest ``r`` with ``beta(s, r) >= n``: how often the busiest step is advanced."""
    if n <= 1:
        return 0
    if s < 1:
        raise ValueError(f"{n} steps cannot be reversed without a snapshot slot (s = {s})")
    lo, hi = 0, 1                       # beta(s, lo) < n; gallop up, then bisect (s = 1: r = n - 1)
    while beta(s, hi) < n:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if beta(s, mid) < n else (lo, mid)
    return hi


def optimal_recomputations(n: int, s: int) -> int:
    """The closed form ``t(n, s)``: the fewest advances (the first sweep's ``n - 1`` included) that
    reverse ``n`` steps with ``s`` slots."""
    n, s = integer("n", n), integer("s", s)
    r = repetitions(n, s)
    return r * n - beta(s + 1, r - 1)


def split(n: int, s: int) -> int:
    """How far to advance before the next snapshot when ``n >= 2`` steps are left to reverse with
    ``s`` slots (the current one's included)."""
    r = repetitions(n, s)
    return max(1, n - beta(s - 1, r), beta(s, r - 2))


def schedule(n: int, s: int) -> Iterator[Action]:
    """The binomial schedule for ``n`` steps and ``s >= 1`` slots, as actions: ``advance i -> j``
    (from the current state), ``snapshot i`` (the current state into a slot), ``restore i`` (the
    current state from its slot), ``free i`` and ``reverse i`` (hand out ``x_i``, the current
    state, which the caller consumes). It starts with ``x_0`` current and reverses ``n - 1`` down
    to 0; a slot is freed just before its last use, so at most ``s`` are held at once."""
    n, s = integer("n", n), integer("s", s)
    stack = [[0, n, s]]       # frames [i, j, slots]: reverse steps i..j-1, x_i in a slot
    cur = 0
    yield (SNAPSHOT, 0, 0)
    while stack:
        frame = stack[-1]
        i, j, slots = frame
        if cur != i:
            yield (RESTORE, i, i)
        if j - i == 1:
            stack.pop()
            yield (FREE, i, i)
            yield (REVERSE, i, i)
            cur = -1
            continue
        k = i + split(j - i, slots)
        yield (ADVANCE, i, k)
        frame[1] = k
        if j - k == 1:
            yield (REVERSE, k, k)
            cur = -1
        else:
            yield (SNAPSHOT, k, k)
            stack.append([k, j, slots - 1])
            cur = k


def recomputations(n: int, s: int) -> int:
    """The advances the schedule makes (by playing it): ``optimal_recomputations(n, s)``."""
    return sum(j - i for kind, i, j in schedule(n, s) if kind == ADVANCE)


def slots_for(n: int, budget_states: int) -> int:
    """The snapshot slots worth having for ``n`` steps within ``budget_states`` snapshots: more
    than ``n - 1`` recompute nothing more (``t(n, n - 1) = n - 1``, the first sweep only)."""
    n, budget_states = integer("n", n), integer("budget_states", budget_states)
    return max(1, min(budget_states, n - 1))


@dataclass(frozen=True)
class RevolvePlan:
    """Checkpointing ``N`` grid intervals in ``n`` segments of ``m`` (even) with ``slots``
    snapshots: ``memory_states`` (slots + the rows of the longest segment) at the peak of the
    backward; ``readvanced`` segments and ``readvanced_steps`` grid steps solved again beyond
    the forward sweep and the one recomputation of each segment's rows; ``factor``: grid steps
    solved in all per grid interval (2 for sqrt(N) checkpointing: the forward and the rows)."""

    N: int
    m: int
    n: int
    slots: int
    memory_states: int
    readvanced: int
    readvanced_steps: int
    factor: float


def _even_count(N: int, m: int) -> Tuple[int, int]:
    """``(segments, longest)`` of ``N`` intervals in segments of ``m``, the top one taking the
    remainder (at least 3 intervals, as ``plan.segments`` lays them out)."""
    top = N % m or m
    if top < 3 and N - top >= m:
        top += m
    return 1 + (N - top) // m, max(top, m) if N > top else top


def plan_for(N: int, budget_states: int, count: Optional[Callable[[int], Tuple[int, int]]] = None) -> RevolvePlan:
    """The segment length ``m`` (even) and slots that solve the fewest grid steps for ``N`` grid
    intervals within ``budget_states`` states (slots + the rows of the segment being reversed);
    ties go to less memory. ``count(m) -> (segments, longest segment's intervals)`` (default: the
    layout of ``plan.segments`` over one phase) lets the caller count its own segments."""
    N, budget_states = integer("N", N), integer("budget_states", budget_states)
    count = count or (lambda m: _even_count(N, m))
    best = None
    top_m = min(max(2, N), 2 * math.isqrt(N) + 4, budget_states)
    for m in range(2, top_m + 1, 2):
        n, longest = count(m)
        room = budget_states - (longest + 1)
        if room < 1:
            continue
        s = slots_for(n, room)
        again = optimal_recomputations(n, s) - (n - 1)
        key = (again * m, s + longest + 1)
        if best is None or key < best[0]:
            best = (key, m, n, s, again)
    if best is None:
        raise ValueError(f"argument 'budget_states' must leave room for one snapshot and the rows of the "
                         f"longest segment of N={N} grid intervals (at least {count(2)[1] + 2} states), "
                         f"got {budget_states}")
    (steps, memory), m, n, s, again = best
    return RevolvePlan(N=N, m=m, n=n, slots=s, memory_states=memory, readvanced=again, readvanced_steps=steps,
                       factor=(2 * N + steps) / N)


class RevolveCheckpoints:
    """Fixed-step checkpoints by the binomial schedule, in place of one state per segment.

    ``segments``: ``[(c, e)]`` grid-row ranges top first, as ``plan.segments`` gives them (each
    one's ``c`` the next one's ``e``); ``slots``: snapshots kept at most (``x_0``'s included);
    ``advance(y, c, e) -> y_e``: the state at row ``e`` solved from ``y`` at row ``c``, keeping
    nothing, never writing into ``y``. :meth:`run` makes the forward sweep and gives the state at
    the top row; :meth:`state` then gives, segment by segment top first, the state at each
    segment's bottom row ``c``, advancing from snapshots as the schedule says. Asking for the top
    segment's state again starts another backward pass (``x_0`` is kept). Counters: ``advances``
    (segments advanced per the schedule: ``optimal_recomputations(n, slots)`` a pass, the
    first sweep's ``n - 1`` included, the top segment's solve in :meth:`run` not),
    ``peak_snapshots``, ``sweeping`` (True inside :meth:`run`)."""

    def __init__(self, segments: Sequence[Tuple[int, int]], slots: int, advance: Callable):
        segs = [(int(c), int(e)) for c, e in segments]
        if not segs:
            raise ValueError("argument 'segments' must hold at least one (c, e) row range, got none")
        for (c, e), nxt in zip(segs, segs[1:] + [None]):
            if not c < e or (nxt is not None and nxt[1] != c):
                raise ValueError(f"argument 'segments' must be consecutive (c, e) row ranges with c < e, top first "
                                 f"(each c the next one's e), got {(c, e)} followed by {nxt}")
        self.forward_order: List[Tuple[int, int]] = segs[::-1]      # step i: x_i at row c -> x_{i+1}
        self.n, self.slots, self._advance = len(segs), integer("slots", slots), advance
        self._index = {c: i for i, (c, _) in enumerate(self.forward_order)}
        self.advances = self.peak_snapshots = 0
        self.sweeping = False
        self._snaps: Dict[int, torch.Tensor] = {}
        self._x0: Optional[torch.Tensor] = None
        self._actions: Optional[Iterator[Action]] = None
        self._cur: Optional[Tuple[int, torch.Tensor]] = None
        self._next = -1          # the step whose state the next state() hands out (-1: none)

    def run(self, y0: torch.Tensor) -> torch.Tensor:
        """The forward sweep from ``y0`` at the bottom row: snapshots as the schedule takes them,
        then the top segment; the state at the top row (``y0`` is kept, not copied)."""
        self._x0 = y0
        self.sweeping = True
        try:
            self._start()
            c, e = self.forward_order[-1]
            return self._advance(self._cur[1], c, e)
        finally:
            self.sweeping = False

    def _start(self) -> None:
        self._actions = schedule(self.n, self.slots)
        self._snaps.clear()
        self._cur = (0, self._x0)
        self._next = self.n - 1
        self._play()

    def _play(self) -> None:
        """Carry out actions up to the next ``reverse`` (whose state becomes current)."""
        for kind, i, j in self._actions:
            if kind == ADVANCE:
                k, y = self._cur
                for step in range(i, j):
                    c, e = self.forward_order[step]
                    y = self._advance(y, c, e)
                    self.advances += 1
                self._cur = (j, y)
            elif kind == SNAPSHOT:
                self._snaps[i] = self._cur[1]
                self.peak_snapshots = max(self.peak_snapshots, len(self._snaps))
            elif kind == RESTORE:
                self._cur = (i, self._snaps[i])
            elif kind == FREE:
                del self._snaps[i]
            else:
                assert self._cur[0] == i == self._next, (kind, i, self._cur[0], self._next)
                return
        raise RuntimeError("RevolveCheckpoints: the schedule ended before every segment was handed out")

    def state(self, c: int) -> torch.Tensor:
        """The state at row ``c``, the bottom row of the next segment, top first."""
        i = self._index.get(int(c))
        if i is None:
            raise ValueError(f"argument 'c' must be the bottom row of a segment, got {c}")
        if self._x0 is None:
            raise RuntimeError("RevolveCheckpoints.state: run() has not been called")
        if i == self.n - 1 and self._next != self.n - 1:
            self._start()                       # another backward pass: sweep again from x_0
        if i != self._next:
            raise RuntimeError(f"RevolveCheckpoints.state: segments are handed out top first; expected row "
                               f"{self.forward_order[self._next][0] if self._next >= 0 else None}, got {c}")
        if self._cur is None:
            self._play()
        y = self._cur[1]
        self._cur = None
        self._next = i - 1
        return y

    @property
    def held(self) -> int:
        """States held now: the snapshots and the current one."""
        return len(self._snaps) + (self._cur is not None)
