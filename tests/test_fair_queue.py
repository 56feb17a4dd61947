"""`pipelines.fair_queue.FairQueue`: the order in which jobs leave, tenant by tenant (no server, no threads but
one test's)."""

from __future__ import annotations

import queue
import threading

import pytest
from k5serve.pipelines.fair_queue import FairQueue


def drain_order(q: FairQueue, n: int) -> list:
    return [q.get() for _ in range(n)]


def test_a_newcomer_goes_ahead_of_a_flood():
    q = FairQueue(100)
    for i in range(30):
        q.put_nowait(("a", i), "a")
    assert q.get() == ("a", 0)  # running when b arrives
    q.put_nowait(("b", 0), "b")
    assert q.get() == ("b", 0)  # b waits for the one job of a that was running, no more
    assert drain_order(q, 29) == [("a", i) for i in range(1, 30)]  # first in first out within a tenant


def test_a_lone_tenant_gets_every_turn_and_fifo_holds():
    q = FairQueue(10)
    for i in range(10):
        q.put_nowait(i, "only")
    with pytest.raises(queue.Full):
        q.put_nowait(10, "only")
    assert drain_order(q, 10) == list(range(10)) and q.qsize() == 0


@pytest.mark.parametrize("weights, share", [((1, 1), (6, 6)), ((2, 1), (8, 4)), ((3, 1), (9, 3))])
def test_busy_tenants_share_in_proportion_to_their_weights(weights, share):
    q = FairQueue(100)
    for i in range(20):
        q.put_nowait("a", "a", weights[0])
        q.put_nowait("b", "b", weights[1])
    first = drain_order(q, 12)
    assert (first.count("a"), first.count("b")) == share


def test_an_idle_tenant_saves_no_credit():
    """A tenant that was away for a while gets its fair share from now on, not a burst for the time it was idle."""
    q = FairQueue(100)
    for i in range(10):
        q.put_nowait("a", "a")
    assert drain_order(q, 10) == ["a"] * 10
    for i in range(6):
        q.put_nowait("a", "a")
        q.put_nowait("b", "b")
    assert drain_order(q, 6).count("b") == 3


def test_close_hands_out_what_waits_then_none_and_drain_empties():
    q = FairQueue(10)
    q.put_nowait(1, "a")
    q.put_nowait(2, "b")
    q.put_nowait(3, "a")
    assert q.drain() == [1, 2, 3] and q.qsize() == 0
    q.put_nowait(4, "a")
    q.close()
    assert q.get() == 4 and q.get() is None


def test_get_blocks_until_a_job_comes():
    q = FairQueue(1)
    got = []
    reader = threading.Thread(target=lambda: got.append(q.get()))
    reader.start()
    reader.join(0.2)
    assert reader.is_alive() and not got
    q.put_nowait("job", "a")
    reader.join(5)
    assert got == ["job"]


def test_a_tenant_served_before_the_queue_went_idle_starts_even():
    """b had a job, the queue ran dry and the slot waited for work; then a floods (with twice b's weight) while
    its first job runs, and b comes back: b goes next, its earlier job forgotten."""
    q = FairQueue(100)
    q.put_nowait("b-old", "b")
    assert q.get() == "b-old"
    got = []
    slot = threading.Thread(target=lambda: got.append(q.get()))
    slot.start()
    slot.join(0.2)  # the slot is idle, waiting
    q.put_nowait("a0", "a", 2)
    slot.join(5)
    assert got == ["a0"]
    for i in range(1, 6):
        q.put_nowait(f"a{i}", "a", 2)
    q.put_nowait("b-new", "b")
    assert q.get() == "b-new"


def test_no_bound_below_one_and_nothing_taken_once_closed():
    q = FairQueue(0)  # as queue.Queue: no bound
    for i in range(1000):
        q.put_nowait(i, "a")
    assert q.qsize() == 1000 and not q.full()
    q.close()
    with pytest.raises(queue.Full):
        q.put_nowait("late", "a")
