"""The runner's diff pool: one run's messages in order, runs in parallel, bounded
backlog, a failing task stops the run with its own exception."""

import random
import threading
import time

import pytest

from verify.runner import _OrderedPool


def test_tasks_of_one_key_run_in_submission_order():
    pool, seen = _OrderedPool(threads=4, budget=8), []
    rng = random.Random(0)

    def task(key, i):
        time.sleep(rng.random() * 1e-3)
        seen.append((key, i))

    for i in range(60):
        for key in range(5):
            pool.submit(key, task, key, i)
    pool.close()
    assert len(seen) == 300
    for key in range(5):
        assert [i for k, i in seen if k == key] == list(range(60))


def test_different_keys_run_at_the_same_time():
    pool, meet = _OrderedPool(threads=2, budget=4), threading.Barrier(2, timeout=10)
    met = []
    for key in ("a", "b"):
        # a BrokenBarrierError, raised by close(), if they ran one after the other
        pool.submit(key, lambda k=key: met.append((k, meet.wait())))
    pool.close()
    assert sorted(k for k, _ in met) == ["a", "b"]


def test_one_key_never_runs_two_tasks_at_once():
    pool, running, overlap = _OrderedPool(threads=4, budget=16), [0], []

    def task():
        running[0] += 1
        overlap.append(running[0])
        time.sleep(1e-3)
        running[0] -= 1

    for _ in range(12):
        pool.submit("run", task)
    pool.close()
    assert max(overlap) == 1


def test_a_failure_is_raised_and_later_tasks_are_skipped():
    # one thread: the tasks submitted after `boom` start after it failed, whatever
    # the timing (with two, "b" could run before "a" failed)
    pool, ran = _OrderedPool(threads=1, budget=4), []

    def boom():
        raise ValueError("diff failed")

    pool.submit("a", boom)
    pool.submit("a", ran.append, 1)
    pool.submit("b", ran.append, 2)
    with pytest.raises(ValueError, match="diff failed"):
        pool.close()
    assert ran == []


def test_submit_waits_when_the_budget_is_used():
    pool, release = _OrderedPool(threads=2, budget=2), threading.Event()
    pool.submit("a", release.wait)
    pool.submit("b", release.wait)
    third = threading.Thread(target=pool.submit, args=("c", lambda: None))
    third.start()
    third.join(0.3)
    assert third.is_alive()  # blocked: two tasks already in flight
    release.set()
    third.join(10)
    assert not third.is_alive()
    pool.close()
