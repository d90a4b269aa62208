"""The batch planner: what each iteration of a worker takes, fairly and in chunks (pure)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from meshnode.compute import row_bucket
from meshnode.errors import Overloaded
from meshnode.inference.records import BlockSpan
from meshnode.worker.batching import BatchPlanner, StepJob

SPAN = BlockSpan(0, 6)
ALICE, BOB, CAROL = b"a" * 32, b"b" * 32, b"c" * 32


@dataclass
class FakeSession:
    span: BlockSpan = SPAN
    closed: bool = False


def job(owner: bytes, length: int = 1, start: int = 0, span: BlockSpan = SPAN) -> StepJob:
    return StepJob(owner, FakeSession(span), np.zeros((1, length, 4), np.float32), start)


def owners(works) -> list[bytes]:
    return [w.job.owner for w in works]


def test_decode_rows_are_admitted_round_robin_across_clients():
    """When Alice has ten decode steps waiting and Bob one, and an iteration holds four
    rows, then Bob's step is in the first iteration beside three of Alice's."""
    planner = BatchPlanner(max_rows=4)
    for _ in range(10):
        planner.add(job(ALICE))
    planner.add(job(BOB))
    first = planner.plan()
    assert sorted(owners(first.works)) == [ALICE, ALICE, ALICE, BOB]
    assert planner.waiting(ALICE) == 7 and planner.waiting(BOB) == 0


def test_no_client_fills_every_iteration():
    """When three clients keep many steps waiting, then every iteration holds rows of all
    three, none more than one above another."""
    planner = BatchPlanner(max_rows=8)
    for owner in (ALICE, BOB, CAROL):
        for _ in range(20):
            planner.add(job(owner))
    for _ in range(5):
        taken = owners(planner.plan().works)
        counts = [taken.count(o) for o in (ALICE, BOB, CAROL)]
        assert min(counts) >= 2 and max(counts) - min(counts) <= 1


def test_the_client_served_least_recently_goes_first():
    """When an iteration has room for one row and two clients wait, then they alternate."""
    planner = BatchPlanner(max_rows=1)
    for _ in range(3):
        planner.add(job(ALICE))
        planner.add(job(BOB))
    turns = [owners(planner.plan().works)[0] for _ in range(6)]
    assert turns in ([ALICE, BOB] * 3, [BOB, ALICE] * 3)


def test_a_long_prompt_runs_in_chunks_whatever_else_waits():
    """When a 600-position step waits, alone or beside others, then it runs as chunks of
    256, 256 and 88 positions from its own start, one chunk per iteration."""
    for company in (0, 5):
        planner = BatchPlanner(chunk=256, tokens=512)
        long = job(ALICE, 600, start=10)
        planner.add(long)
        for _ in range(company):
            planner.add(job(BOB, 40))
        seen = []
        while (iteration := planner.plan()) is not None:
            for work in iteration.chunks:
                if work.job is long:
                    seen.append((work.start, work.length))
                    long.done += work.length
                    if long.done < long.length:
                        planner.resume(long)
        assert seen == [(10, 256), (266, 256), (522, 88)]


def test_an_iteration_keeps_to_its_token_budget():
    """When three 300-position prompts wait and an iteration holds 512 positions, then the
    first iteration runs two chunks of 256 and the third prompt waits."""
    planner = BatchPlanner(chunk=256, tokens=512)
    for owner in (ALICE, BOB, CAROL):
        planner.add(job(owner, 300))
    first = planner.plan()
    assert [w.length for w in first.chunks] == [256, 256]
    assert planner.waiting() == 1


def test_decode_rows_are_grouped_by_the_sub_span_of_their_session():
    """When sessions over two sub-spans step, then each sub-span's rows form one group."""
    planner = BatchPlanner()
    planner.add(job(ALICE, span=BlockSpan(0, 3)))
    planner.add(job(BOB, span=BlockSpan(0, 6)))
    planner.add(job(CAROL, span=BlockSpan(0, 3)))
    rows = planner.plan().rows
    assert {span: len(group) for span, group in rows.items()} == {
        BlockSpan(0, 3): 2, BlockSpan(0, 6): 1}


def test_a_client_with_too_many_steps_waiting_is_overloaded():
    """When a client has max_queued steps waiting, then its next one is refused, and
    another client's is not."""
    planner = BatchPlanner(max_queued=2)
    planner.add(job(ALICE))
    planner.add(job(ALICE))
    with pytest.raises(Overloaded):
        planner.add(job(ALICE))
    planner.add(job(BOB))


def test_rows_pad_to_a_few_buckets():
    """When a batch has 1, 3, 17 or 64 rows, then it runs padded to 1, 4, 32 or 64."""
    assert [row_bucket(n) for n in (1, 3, 17, 64)] == [1, 4, 32, 64]


class HeldCompute:
    """Iterations wait until the test finishes them; each row's output is its input + 1."""

    def __init__(self):
        self.iterations: list = []

    def run_iteration(self, iteration):
        from twisted.internet.defer import Deferred

        done = Deferred()
        self.iterations.append((iteration, done))
        return done

    def finish(self):
        iteration, done = self.iterations.pop(0)
        done.callback({work: work.hidden() + 1 for work in iteration.works})


def outcome(d) -> list:
    out: list = []
    d.addBoth(out.append)
    return out


def test_the_scheduler_fires_each_step_with_its_own_positions():
    """When steps of three sessions wait behind a running iteration, then they run as one
    iteration and each step's Deferred fires with its own positions only, a long one's
    chunks put back together in order."""
    from meshnode.worker.batching import BatchScheduler

    compute = HeldCompute()
    scheduler = BatchScheduler(compute, BatchPlanner(chunk=4, tokens=8))
    first = outcome(scheduler.submit(ALICE, FakeSession(), np.zeros((1, 1, 4), np.float32), 0))
    hidden = [np.full((1, n, 4), n, np.float32) for n in (1, 1, 10)]
    waiting = [outcome(scheduler.submit(o, FakeSession(), h, 5))
               for o, h in zip((BOB, CAROL, ALICE), hidden)]
    compute.finish()
    assert np.array_equal(first[0], np.ones((1, 1, 4)))
    assert scheduler.last_rows == 2 and scheduler.last_tokens == 6
    while compute.iterations:
        compute.finish()
    for got, sent in zip(waiting, hidden):
        assert np.array_equal(got[0], sent + 1)
    assert scheduler.iterations == 4  # the first, then rows + chunk 1, chunk 2, chunk 3


def test_a_cancelled_waiting_step_never_runs_and_overload_is_per_client():
    """When a waiting step is cancelled, then no iteration holds it; when a client has its
    limit of steps waiting, then its next is Overloaded and another client's is taken."""
    from meshnode.worker.batching import BatchScheduler

    compute = HeldCompute()
    scheduler = BatchScheduler(compute, BatchPlanner(max_queued=1))
    step = np.zeros((1, 1, 4), np.float32)
    outcome(scheduler.submit(ALICE, FakeSession(), step, 0))  # running
    cancelled = scheduler.submit(BOB, FakeSession(), step, 0)
    cancelled.addErrback(lambda _: None)
    cancelled.cancel()
    outcome(scheduler.submit(ALICE, FakeSession(), step, 0))
    (refused,) = outcome(scheduler.submit(ALICE, FakeSession(), step, 0))
    assert refused.check(Overloaded)
    outcome(scheduler.submit(CAROL, FakeSession(), step, 0))
    compute.finish()
    (next_iteration, _) = compute.iterations[0]
    assert sorted(owners(next_iteration.works)) == [ALICE, CAROL]


def test_steps_that_arrive_in_one_reactor_turn_start_as_one_iteration():
    """When the compute thread is free and steps of five sessions arrive in one reactor turn,
    then nothing starts before the turn ends, and then all five run as one iteration (not
    one row alone and four behind it); a step after that waits for the running iteration."""
    from twisted.internet.task import Clock

    from meshnode.worker.batching import BatchScheduler

    clock, compute = Clock(), HeldCompute()
    scheduler = BatchScheduler(compute, BatchPlanner(), clock=clock)
    step = np.zeros((1, 1, 4), np.float32)
    burst = [outcome(scheduler.submit(owner, FakeSession(), step, 0))
             for owner in (ALICE, BOB, CAROL, ALICE, BOB)]
    assert compute.iterations == []
    clock.advance(0)
    assert len(compute.iterations) == 1 and scheduler.last_rows == 5
    later = outcome(scheduler.submit(CAROL, FakeSession(), step, 1))
    clock.advance(0)
    assert len(compute.iterations) == 1  # behind the running one
    compute.finish()
    assert all(np.array_equal(got[0], step + 1) for got in burst)
    assert len(compute.iterations) == 1 and scheduler.last_rows == 1
    compute.finish()
    assert np.array_equal(later[0], step + 1)
