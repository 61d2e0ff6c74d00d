"""core.heaps.Due: the deadlines of a table's entries (a worker's runs, a client's pending
requests) come due earliest first whichever way they were pushed, and stay bounded."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zmqdist.core.heaps import Due


@given(
    st.lists(st.tuples(st.floats(0, 50), st.booleans(), st.booleans()), max_size=300),
    st.lists(st.floats(0, 60), max_size=30),
)
def test_what_falls_due_is_every_live_entry_due_earliest_first(pushes, clocks):
    """Runs of in-order deadlines and earlier ones mixed, some entries ended (gone from ``live``)
    as others come: by each time, the keys given out that are still live are exactly the live
    entries due by then, and everything given out comes earliest first."""
    live: dict = {}
    slack = 8
    dl, ref, last = Due(live, slack), {}, 0.0
    for i, (at, in_order, ends) in enumerate(pushes):
        d = max(at, last) if in_order else at
        last = max(last, d)
        live[i] = d
        dl.push(d, i)
        ref[i] = d
        if ends and i % 2 and (i - 1) in live:  # an earlier entry ends (its owner forgets it)
            del live[i - 1]
        assert len(dl) <= 2 * len(live) + slack + 1  # swept as it passes the bound
    for now in [*sorted(clocks), 100.0]:
        got = []
        while (k := dl.pop_due(now)) is not None:
            got.append(k)
        assert [ref[k] for k in got] == sorted(ref[k] for k in got)  # earliest first
        assert all(ref[k] <= now for k in got)
        assert {k for k in got if k in live} == {k for k, d in live.items() if d <= now}
        for k in got:
            live.pop(k, None)
        first = dl.first()
        waiting = list(live.values())
        assert first is None or first <= min(waiting, default=first)
        assert (first is None) <= (not waiting)
    assert len(dl) == 0 and dl.first() is None


def test_entries_ended_soon_leave_as_new_ones_come():
    """Entries that end soon after they came (tasks run in milliseconds against a timeout of
    seconds) are dropped from the head as the next ones come: the lists stay short, and one that
    still waits at the head keeps its place."""
    live: dict = {}
    dl = Due(live, 1024)
    for t in range(10_000):
        live[t] = 30.0 + t / 1000
        dl.push(live[t], t)
        if t >= 3:
            del live[t - 3]  # ended three arrivals later
    assert len(dl) <= 6 and dl.first() == pytest.approx(30.0 + 9_996 / 1000, abs=0.002)
    live[10_000] = 50.0
    dl.push(50.0, 10_000)
    live[10_001] = 50.5
    dl.push(50.5, 10_001)
    live.clear()
    live[10_001] = 50.5
    for t in range(10_002, 10_010):  # the ended one ahead of it goes; the one that waits stays
        dl.push(51.0, t)
    got = []
    while (k := dl.pop_due(50.9)) is not None:
        got.append(k)
    assert got in ([10_001], [10_000, 10_001])


def test_a_sweep_keeps_only_live_entries_in_both_structures():
    live: dict = {}
    dl = Due(live, 0)
    for t in range(20):
        live[t] = 100.0 - t  # each earlier than the last: the heap
        dl.push(live[t], t)
    for t in range(20, 40):
        live[t] = 200.0 + t  # in order: the lists
        dl.push(live[t], t)
    for t in range(0, 40, 2):
        del live[t]
    dl.sweep()
    assert len(dl) == 20 and dl.first() == 100.0 - 19
    assert [dl.pop_due(1000.0) for _ in range(20)] == [*range(19, 0, -2), *range(21, 40, 2)]
    assert dl.pop_due(1000.0) is None
