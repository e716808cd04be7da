"""Background jobs (disposal, prewarm creates): concurrency, thread reuse, waiting, failures."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from pytest_kode.lifecycle.jobs import BackgroundJobs


def test_jobs_run_concurrently_up_to_the_thread_limit() -> None:
    jobs = BackgroundJobs(2, name="kode-test")
    running = 0
    most = 0
    lock = threading.Lock()
    release = threading.Event()

    def job() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        release.wait(10)
        with lock:
            running -= 1

    for _ in range(5):
        jobs.submit(job)
    deadline = time.monotonic() + 10
    while most < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert jobs.pending == 5
    release.set()
    assert jobs.wait(10)
    assert most == 2  # two at once: the limit, and the three others waited for a thread
    assert jobs.pending == 0


def test_a_job_handed_over_while_a_thread_is_idle_starts_no_thread() -> None:
    # Handing a job over on a test's path must not wait for a new thread to start.
    jobs = BackgroundJobs(4, name="kode-test")
    seen: set[int] = set()
    for _ in range(10):
        jobs.submit(lambda: seen.add(threading.get_ident()))
        assert jobs.wait(10)
        time.sleep(0.01)  # the thread is back waiting for work
    assert len(seen) == 1


def test_wait_is_bounded_and_says_when_jobs_are_still_running() -> None:
    jobs = BackgroundJobs(1, name="kode-test")
    release = threading.Event()
    jobs.submit(lambda: release.wait(10) and None)
    started = time.monotonic()
    assert not jobs.wait(0.2)
    assert time.monotonic() - started < 5
    release.set()
    assert jobs.wait(10)


def test_a_failing_job_is_logged_and_the_others_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    jobs = BackgroundJobs(1, name="kode-test")
    done: list[int] = []

    def broken() -> None:
        raise RuntimeError("a bug in a job")

    with caplog.at_level(logging.ERROR, logger="pytest_kode.lifecycle.jobs"):
        jobs.submit(broken)
        jobs.submit(lambda: done.append(1))
        assert jobs.wait(10)
    assert done == [1]
    assert "a background job (kode-test) failed" in caplog.text
    assert "a bug in a job" in caplog.text


def test_prewarm_creates_its_spares_on_the_same_few_threads() -> None:
    from pytest_kode.lifecycle.prewarm import SparePool

    threads: list[threading.Thread] = []  # kept, so two different threads never share an id
    discarded: list[object] = []

    def create(args: object) -> object:
        threads.append(threading.current_thread())
        return object()

    pool = SparePool(2, create, discarded.append, check_after_s=60)  # type: ignore[arg-type]
    tests = 12
    for number in range(tests):
        spare = pool.take("kind", None, later=tests - number - 1)
        if spare is not None:
            assert pool.claim(spare) is not None
        time.sleep(0.01)  # the test's body: the spares' creates finish meanwhile
    pool.close()
    assert pool.taken == tests - 1  # every test but the first found a spare
    assert len(threads) == tests - 1 and discarded == []
    assert len({id(thread) for thread in threads}) <= 2  # not a thread per create


def test_the_end_of_a_run_disposes_ready_spares_without_waiting_for_creates_in_flight() -> None:
    # Their kills overlap with the slow create instead of following it; that one is disposed as
    # soon as it lands, and the close waits for it (so nothing outlives the run).
    from pytest_kode.lifecycle.prewarm import SparePool

    gate = threading.Event()
    lock = threading.Lock()
    made: list[str] = []
    discarded: list[object] = []

    def create(args: object) -> str:
        with lock:
            name = f"sandbox-{len(made) + 1}"
            made.append(name)
        if name != "sandbox-1":
            gate.wait(10)  # a slow create, still in flight at the end of the run
        return name

    pool = SparePool(2, create, discarded.append)  # type: ignore[arg-type]
    pool.top_up("kind", None)
    deadline = time.monotonic() + 10
    while len(made) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    closing = threading.Thread(target=pool.close)
    closing.start()
    while not discarded and time.monotonic() < deadline:
        time.sleep(0.01)
    assert discarded == ["sandbox-1"]
    assert closing.is_alive()  # still waiting for the create in flight
    gate.set()
    closing.join(10)
    assert not closing.is_alive()
    assert discarded == ["sandbox-1", "sandbox-2"]
    assert pool.unused == 2
