"""Binomial (Revolve) checkpointing (amaml_ext.metagrad.revolve, issue 25): the schedule attains
the closed-form optimum t(n, s), which a dynamic program over split points and an exhaustive
search over all schedules confirm for small n and s; the checkpoints hand out the forward's
states exactly, top segment first, within s snapshots; the plan picks (m, s) within a budget."""

import heapq
import math
from functools import lru_cache

import pytest
import torch

from amaml_ext.metagrad.plan import segment_length, segments
from amaml_ext.metagrad.revolve import (ADVANCE, FREE, RESTORE, REVERSE, SNAPSHOT, RevolveCheckpoints, beta,
                                        optimal_recomputations, plan_for, recomputations, schedule, slots_for)


@lru_cache(maxsize=None)
def dp(n: int, s: int) -> float:
    """Fewest advances reversing n steps from a stored x_0 with s slots (x_0's included), over
    every split point: advance k, snapshot, reverse the top n - k with s - 1 slots, restore,
    reverse the bottom k with s. The last step is reversed from the current state, unsaved."""
    if n == 1:
        return 0
    if s == 0:
        return math.inf
    return min(k + dp(n - k, s - 1) + dp(k, s) for k in range(1, n))


def exhaustive(n: int, s: int) -> int:
    """Fewest advances over *all* schedules (Dijkstra over (current, snapshots, steps left)):
    advance the current state by one step (cost 1), snapshot it, restore or free a snapshot, or
    reverse step j - 1 when the current state is x_{j-1} (consuming it)."""
    start = (0, 0, frozenset(), n)
    seen, heap = {}, [start]
    while heap:
        cost, cur, snaps, j = heapq.heappop(heap)
        if j == 0:
            return cost
        if seen.get((cur, snaps, j), math.inf) <= cost:
            continue
        seen[(cur, snaps, j)] = cost
        moves = []
        if cur >= 0 and cur < j - 1:
            moves.append((cost + 1, cur + 1, snaps, j))
        if cur >= 0 and cur not in snaps and len(snaps) < s:
            moves.append((cost, cur, snaps | {cur}, j))
        for p in snaps:
            moves.append((cost, p, snaps, j))
            moves.append((cost, cur, snaps - {p}, j))
        if cur == j - 1:
            moves.append((cost, -1, snaps, j - 1))
        for m in moves:
            heapq.heappush(heap, m)
    raise AssertionError("unreachable")


def test_beta_is_the_binomial_coefficient():
    assert beta(3, 2) == 10 and beta(20, 3) == 1771 and beta(1, 4) == 5 and beta(4, 0) == 1
    assert beta(5, -1) == 0


@pytest.mark.parametrize("s", range(1, 9))
def test_closed_form_equals_the_split_dynamic_program(s):
    for n in range(1, 61):
        assert optimal_recomputations(n, s) == dp(n, s), (n, s)


@pytest.mark.parametrize("n,s", [(n, s) for n in range(1, 8) for s in range(1, 4)])
def test_closed_form_is_the_optimum_over_all_schedules(n, s):
    assert exhaustive(n, s) == optimal_recomputations(n, s)


def test_known_values():
    assert [optimal_recomputations(n, 1) for n in range(1, 6)] == [0, 1, 3, 6, 10]     # n(n-1)/2
    assert optimal_recomputations(10, 3) == 15 and optimal_recomputations(100000, 20) == 534220
    assert all(optimal_recomputations(n, n - 1) == n - 1 for n in range(2, 50))         # the sweep only


@pytest.mark.parametrize("s", [1, 2, 3, 5, 8, 13])
def test_schedule_attains_the_optimum(s):
    for n in list(range(1, 300)) + [1000, 4567, 10**4]:
        assert recomputations(n, s) == optimal_recomputations(n, s), (n, s)


def _play(n, s):
    """Run the schedule on positions only, checking every action is legal; the reversal order,
    the advances and the peak snapshots."""
    cur, snaps, order, adv, peak = 0, set(), [], 0, 0
    for kind, i, j in schedule(n, s):
        if kind == ADVANCE:
            assert cur == i < j <= n - 1, (kind, i, j, cur)
            cur, adv = j, adv + j - i
        elif kind == SNAPSHOT:
            assert cur == i and i not in snaps
            snaps.add(i)
            peak = max(peak, len(snaps))
        elif kind == RESTORE:
            assert i in snaps
            cur = i
        elif kind == FREE:
            snaps.remove(i)
        else:
            assert kind == REVERSE and cur == i
            order.append(i)
            cur = -1
    return order, adv, peak, snaps


@pytest.mark.parametrize("n,s", [(1, 1), (2, 1), (7, 1), (7, 2), (50, 3), (200, 4), (333, 7), (40, 60)])
def test_schedule_is_legal_and_reverses_last_first(n, s):
    order, adv, peak, left = _play(n, s)
    assert order == list(range(n - 1, -1, -1))
    assert adv == optimal_recomputations(n, s)
    assert peak <= min(s, n) and not left


def _forward_states(segs, y0, advance):
    """The state at the bottom row of each segment (forward order), solved once in sequence."""
    out, y = {}, y0
    for c, e in reversed(segs):
        out[c] = y
        y = advance(y, c, e)
    return out, y


def _nonlinear(calls):
    def advance(y, c, e):
        calls.append((c, e))
        for r in range(c, e):
            y = y + 0.01 * torch.sin(y * (r + 1)) - 1e-3 * y ** 3
        return y
    return advance


@pytest.mark.parametrize("N,m,s", [(40, 2, 1), (40, 2, 3), (101, 4, 2), (300, 6, 5), (1000, 32, 4), (64, 8, 100)])
def test_checkpoints_hand_out_the_forward_states_exactly(N, m, s):
    segs = segments(0, N, m)
    calls = []
    advance = _nonlinear(calls)
    y0 = torch.linspace(-1, 1, 5, dtype=torch.float64)
    ref, y_T = _forward_states(segs, y0, _nonlinear([]))
    rc = RevolveCheckpoints(segs, s, advance)
    assert torch.equal(rc.run(y0.clone()), y_T) and rc.sweeping is False
    n = len(segs)
    for c, _ in segs:
        assert rc.held <= s + 1
        y = rc.state(c)
        assert torch.equal(y, ref[c]), c
    assert rc.advances == recomputations(n, s) == optimal_recomputations(n, s)
    assert len(calls) == rc.advances + 1                    # + the top segment in run()
    assert rc.peak_snapshots <= min(s, n)
    assert all(segs[-1 - ([c for c, _ in segs[::-1]].index(c))] == (c, e) for c, e in calls)
    # another backward pass (gradcheck, retain_graph) sweeps again from x_0
    for c, _ in segs:
        assert torch.equal(rc.state(c), ref[c])
    assert rc.advances == 2 * optimal_recomputations(n, s)


def test_state_top_first_only_and_after_run():
    segs = segments(0, 20, 2)
    rc = RevolveCheckpoints(segs, 2, lambda y, c, e: y + (e - c))
    with pytest.raises(RuntimeError, match="run"):
        rc.state(segs[0][0])
    assert rc.run(0) == 20
    with pytest.raises(RuntimeError, match="top first"):
        rc.state(segs[2][0])
    with pytest.raises(ValueError, match="bottom row"):
        rc.state(5)
    assert [rc.state(c) for c, _ in segs] == [c for c, _ in segs]


@pytest.mark.parametrize("bad", [[], [(10, 20), (0, 9)], [(10, 10)], [(0, 10), (10, 20)]])
def test_segments_must_be_consecutive_top_first(bad):
    with pytest.raises(ValueError, match="segments"):
        RevolveCheckpoints(bad, 2, lambda y, c, e: y)


def test_hundred_thousand_segments_with_twenty_slots():
    """n = 100,000 segments, s = 20: the schedule is made as it is played (O(n r)); at most 20
    snapshots, 534,220 advances, each state handed out the forward's. (Its speed is no part of
    the test.)"""
    n, s = 100_000, 20
    segs = [(c, c + 1) for c in range(n - 1, -1, -1)]
    rc = RevolveCheckpoints(segs, s, lambda y, c, e: y + (e - c))
    assert rc.run(0) == n
    peak_held = 0
    for c, _ in segs:
        assert rc.state(c) == c
        peak_held = max(peak_held, rc.held)
    assert rc.advances == optimal_recomputations(n, s) == 534_220
    assert rc.peak_snapshots == s and peak_held <= s


def test_slots_for():
    assert slots_for(100, 10) == 10 and slots_for(100, 1000) == 99 and slots_for(1, 5) == 1
    with pytest.raises(ValueError, match="budget_states"):
        slots_for(10, 0)


def _exhaustive_plan(N, budget):
    """The fewest grid steps solved over every even m and every slot count that fit the budget."""
    best = None
    for m in range(2, N + 2, 2):
        segs = segments(0, N, m)
        n, longest = len(segs), max(e - c for c, e in segs)
        for s in range(1, budget - longest):
            steps = (optimal_recomputations(n, s) - (n - 1)) * m
            best = steps if best is None else min(best, steps)
    return best


def _count(N):
    def count(m):
        segs = segments(0, N, m)
        return len(segs), max(e - c for c, e in segs)
    return count


@pytest.mark.parametrize("N", [10, 37, 100, 250])
def test_plan_is_the_best_within_the_budget(N):
    for budget in (6, 9, 14, 25, 40, 80):
        p = plan_for(N, budget, _count(N))
        assert p.memory_states <= budget and p.m % 2 == 0
        n, longest = _count(N)(p.m)
        assert p.n == n and p.memory_states == p.slots + longest + 1
        assert p.readvanced == optimal_recomputations(p.n, p.slots) - (p.n - 1)
        assert p.readvanced_steps == _exhaustive_plan(N, budget), (N, budget)
        assert p.factor == (2 * N + p.readvanced_steps) / N


def test_plan_default_count_matches_the_plans_segments():
    for N in (3, 4, 5, 17, 100, 1001, 100_000):
        for m in (2, 4, 6, segment_length(N)):
            assert plan_for.__globals__["_even_count"](N, m) == _count(N)(m), (N, m)


def test_plan_sqrt_budget_recomputes_nothing_and_small_budgets_trade():
    N = 100_000
    m = segment_length(N)
    sqrt_memory = len(segments(0, N, m)) + 1 + m + 1          # today's kept states + one segment's rows
    assert plan_for(N, sqrt_memory).readvanced == 0 and plan_for(N, sqrt_memory).factor == 2.0
    factors = [plan_for(N, b).factor for b in (400, 200, 100, 40, 20, 10)]
    assert factors == sorted(factors) and factors[0] > 2.0 and factors[-1] < 20
    with pytest.raises(ValueError, match="budget_states"):
        plan_for(N, 4)


def test_repetitions_is_the_smallest_r_that_fits():
    from amaml_ext.metagrad.revolve import repetitions
    for s in range(1, 7):
        for n in range(1, 700):
            r = repetitions(n, s)
            assert beta(s, r) >= n and (r == 0 or beta(s, r - 1) < n), (n, s, r)
