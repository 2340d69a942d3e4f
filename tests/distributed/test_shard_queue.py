"""The shard queue without Ray: assignment order, lost workers, giving up, straggler copies, and the invariants
under random event sequences (hypothesis, derandomized)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.distributed.queue import Shard, ShardQueue


def make_queue(n: int, work: float = 100.0, retries: int = 2, reissue: bool = True) -> ShardQueue:
    return ShardQueue(iter([Shard(i, work, 10) for i in range(n)]), retries, reissue)


def test_new_shards_go_in_order_and_lost_ones_come_back_first():
    q = make_queue(4)
    a, b = q.assign("a", 0), q.assign("b", 0)
    assert (a.shard.shard_id, b.shard.shard_id) == (0, 1)
    assert q.lost("a") is None  # shard 0 goes back to the front
    assert q.assign("c", 1).shard.shard_id == 0
    assert q.assign("d", 1).shard.shard_id == 2
    assert q.stats.retried == 1 and q.stats.workers_lost == 1


def test_a_shard_is_given_up_after_max_retries():
    q = make_queue(1, retries=2)
    for i in range(2):
        q.assign(f"w{i}", i)
        assert q.lost(f"w{i}") is None
    q.assign("w2", 2)
    given_up = q.lost("w2")
    assert given_up is not None and given_up.state == "given_up" and given_up.attempts == 3
    assert q.finished and q.stats.given_up == 1


def test_an_idle_worker_copies_the_straggler_and_the_first_commit_cancels_the_other():
    q = make_queue(3, work=100.0)
    for w in "abc":
        q.assign(w, 0)
    q.progress("a", 100, 10)
    assert q.committed("a", 10) == []  # fleet rate now 10 work/s: a fresh copy needs 10 s
    q.progress("b", 90, 10)  # b will finish at ~11
    q.progress("c", 10, 10)  # c is slow: projected at 100
    copy = q.assign("a", 10)
    assert copy is not None and copy.is_copy and copy.shard.shard_id == 2
    assert q.assign("d", 10) is None  # at most one copy per shard, and b is nearly done
    assert q.committed("a", 20) == ["c"]  # the copy won: c's attempt is to be cancelled
    q.cancelled("c")
    assert q.stats.reissued == 1 and q.stats.copies_won == 1
    q.committed("b", 21)
    assert q.finished


def test_no_copy_when_a_fresh_one_would_not_finish_first():
    q = make_queue(2, work=100.0)
    q.assign("a", 0), q.assign("b", 0)
    q.progress("a", 100, 10)
    q.committed("a", 10)
    q.progress("b", 95, 10)
    assert q.assign("a", 10) is None


def test_without_reissue_idle_workers_wait():
    q = make_queue(2, reissue=False)
    q.assign("a", 0), q.assign("b", 0)
    q.committed("a", 5)
    assert q.assign("a", 5) is None


def test_a_lost_copy_does_not_requeue_a_shard_whose_original_still_runs():
    q = make_queue(1, work=100.0)
    q.assign("a", 0)
    copy = q.assign("b", 0)  # no fleet rate yet: any straggler qualifies
    assert copy.is_copy
    assert q.lost("b") is None and not q.pending
    q.committed("a", 3)
    assert q.finished


EVENTS = st.lists(st.tuples(st.sampled_from(["assign", "progress", "commit", "lose", "cancel"]),
                            st.integers(0, 4), st.floats(0, 200)), max_size=80)


@settings(derandomize=True, max_examples=300, deadline=None)
@given(n=st.integers(0, 6), events=EVENTS)
def test_invariants_under_random_events(n, events):
    q = make_queue(n, retries=1)
    now = 0.0
    shards: dict[int, Shard] = {}
    for kind, w, x in events:
        now += 1
        worker = f"w{w}"
        if kind == "assign" and worker not in q.running:
            a = q.assign(worker, now)
            if a is not None:
                shards[a.shard.shard_id] = a.shard
        elif kind == "progress":
            q.progress(worker, x, now)
        elif kind == "commit" and worker in q.running:
            q.committed(worker, now)
        elif kind == "lose":
            q.lost(worker)
        elif kind == "cancel" and worker in q.running and len(q.attempts_of(q.running[worker].shard)) > 1:
            q.cancelled(worker)
        # a shard is in one state; a running one has 1 or 2 attempts on distinct workers
        for s in shards.values():
            attempts = q.attempts_of(s)
            assert (s.state == "running") == bool(attempts), (s, attempts)
            assert len(attempts) <= 2
            assert (s in q.pending) == (s.state == "pending")
        assert len({id(a) for a in q.running.values()}) == len(q.running)
    # drain: every shard ends committed or given up, each exactly once
    for _ in range(100):
        if q.finished:
            break
        for w in list(q.running)[:1]:  # the oldest attempt still running commits
            q.committed(w, now)
        for w in ["x", "y"]:
            if w not in q.running:
                q.assign(w, now)
    assert q.finished
    assert len(shards) <= n
    states = [s.state for s in shards.values()]
    assert all(s in ("committed", "given_up") for s in states)
