"""The job queue on its own: the per-client cap, cancelling a queued and a running job, results
forgotten by age and by count, and a worker that survives whatever a job raises."""

from __future__ import annotations

import threading
import time

import pytest

from duomodal.serve.jobs import JobFinishedError, JobOutput, JobQueue, QueueFullError

pytestmark = pytest.mark.timeout(30)


def wait_until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.005)


def quick(control):
    control.progress(1, 1)
    return JobOutput([], None)


class Gate:
    """A job that runs until it is let go, reporting progress every few milliseconds."""

    def __init__(self):
        self.release = threading.Event()
        self.steps = 0

    def __call__(self, control):
        while not self.release.is_set():
            self.steps += 1
            control.progress(self.steps, 10**6)
            time.sleep(0.002)
        return JobOutput([], None)


def test_one_client_cannot_fill_the_queue():
    jobs = JobQueue(max_pending=4, max_per_client=2)
    gate = Gate()
    try:
        jobs.submit("generate", "a", gate, client="10.0.0.1")
        jobs.submit("generate", "b", gate, client="10.0.0.1")
        with pytest.raises(QueueFullError) as refused:
            jobs.submit("generate", "c", gate, client="10.0.0.1")
        assert str(refused.value) == (
            "you already have 2 generation jobs queued or running (at most 2 per client): "
            "wait for one to finish, or cancel one"
        )
        jobs.submit("generate", "d", gate, client="10.0.0.2")  # another client still gets in
        jobs.submit("generate", "e", gate, client="10.0.0.3")
        with pytest.raises(QueueFullError, match="^4 generation jobs are already queued or running"):
            jobs.submit("generate", "f", gate, client="10.0.0.4")
    finally:
        gate.release.set()
        jobs.shutdown()


def test_cancel_a_queued_job_and_a_running_one():
    jobs = JobQueue(max_pending=4, max_per_client=4)
    gate = Gate()
    try:
        running = jobs.submit("generate", "running", gate)
        queued = jobs.submit("generate", "queued", quick)
        wait_until(lambda: running.done > 0)
        assert jobs.cancel(queued.id) is queued
        assert (queued.status, queued.error) == ("cancelled", "cancelled before it started")
        assert jobs.cancel(running.id) is running and running.status == "cancelling"
        wait_until(lambda: running.finished)
        assert (running.status, running.error, running.output) == ("cancelled", "cancelled", None)
        assert not gate.release.is_set()  # it stopped at a progress report, not by finishing
        with pytest.raises(JobFinishedError, match=f"^job {running.id} has already finished \\(cancelled\\)"):
            jobs.cancel(running.id)
        assert jobs.cancel("0" * 32) is None
        # The queue goes on: the cancelled job's slot is free and the next job runs.
        after = jobs.submit("generate", "after", quick)
        wait_until(lambda: after.finished)
        assert after.status == "done" and queued.output is None
    finally:
        gate.release.set()
        jobs.shutdown()


def test_finished_jobs_are_forgotten_by_age_and_by_count():
    now = [1000.0]
    jobs = JobQueue(max_pending=2, max_per_client=2, max_kept=3, max_age_s=60.0, clock=lambda: now[0])
    try:
        first = jobs.submit("generate", "first", quick)
        wait_until(lambda: first.finished)
        now[0] += 30
        second = jobs.submit("generate", "second", quick)
        wait_until(lambda: second.finished)
        now[0] += 31  # first finished 61 s ago, second 31 s ago
        assert jobs.get(first.id) is None and jobs.get(second.id) is second
        more = [jobs.submit("generate", str(n), quick) for n in range(1)]
        for job in more:
            wait_until(lambda job=job: job.finished)
        more += [jobs.submit("generate", "x", quick), jobs.submit("generate", "y", quick)]
        for job in more:
            wait_until(lambda job=job: job.finished)
        # Four remembered jobs, at most three kept: the oldest finished one goes first.
        assert jobs.get(second.id) is None and all(jobs.get(job.id) is job for job in more)
    finally:
        jobs.shutdown()


def test_finished_jobs_are_forgotten_when_their_images_take_too_much_memory():
    from PIL import Image

    def four_images(control):  # 4 x 16 x 16 x 3 = 3072 bytes
        return JobOutput([Image.new("RGB", (16, 16)) for _ in range(4)], None)

    jobs = JobQueue(max_pending=2, max_kept=32, max_kept_bytes=7000)
    try:
        done = []
        for n in range(3):
            done.append(jobs.submit("generate", str(n), four_images))
            wait_until(lambda: done[-1].finished)
        assert done[0].image_bytes == 3072
        jobs.submit("generate", "more", quick)  # forgetting happens on the queue's next call
        assert jobs.get(done[0].id) is None and jobs.get(done[1].id) is done[1] and jobs.get(done[2].id) is done[2]
    finally:
        jobs.shutdown()


@pytest.mark.parametrize("error", [MemoryError("no memory"), GeneratorExit("stray"), RuntimeError("bug"),
                                   BaseException("odd")])
def test_the_worker_survives_any_error_and_reports_the_job_failed(error):
    jobs = JobQueue(max_pending=2)

    def fails(control):
        raise error

    try:
        failed = jobs.submit("generate", "boom", fails)
        wait_until(lambda: failed.finished)
        assert failed.status == "failed"
        assert failed.error == f"generation failed: {type(error).__name__}: {error}"
        after = jobs.submit("generate", "after", quick)
        wait_until(lambda: after.finished)
        assert after.status == "done"
    finally:
        jobs.shutdown()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the SystemExit, re-raised
def test_a_worker_stopped_by_system_exit_is_replaced_at_the_next_submit(monkeypatch):
    # The dying worker thread unwinds slowly (its excepthook sleeps): a submit made while it is still
    # alive, though its job has finished, must not count on it.
    monkeypatch.setattr(threading, "excepthook", lambda args: time.sleep(0.2))
    jobs = JobQueue(max_pending=2)

    def exits(control):
        raise SystemExit(3)

    try:
        stopped = jobs.submit("generate", "exit", exits)
        wait_until(lambda: stopped.finished)
        assert (stopped.status, stopped.error) == ("failed", "generation stopped: SystemExit")
        after = jobs.submit("generate", "after", quick)
        wait_until(lambda: after.finished)
        assert after.status == "done"
    finally:
        jobs.shutdown()


def test_a_preview_is_published_while_the_job_runs():
    jobs = JobQueue(max_pending=2)
    seen = threading.Event()
    go_on = threading.Event()

    def previews(control):
        control.preview(["partial"], first=0, rows=1, grid_rows=4)
        control.preview(["partial", "more"], first=0, rows=2, grid_rows=4)
        seen.set()
        go_on.wait(5)
        return JobOutput([], None)

    try:
        job = jobs.submit("generate", "p", previews)
        seen.wait(5)
        assert (job.preview.version, job.preview.rows, job.preview.images) == (2, 2, ["partial", "more"])
        go_on.set()
        wait_until(lambda: job.finished)
        assert job.status == "done" and job.preview.version == 2
    finally:
        jobs.shutdown()


def test_bad_queue_settings_are_refused():
    with pytest.raises(ValueError, match="max_per_client=0, max_age_s=60: need at least 1 and more than 0"):
        JobQueue(max_per_client=0, max_age_s=60)
    with pytest.raises(ValueError, match="need 1 <= max_pending <= max_kept"):
        JobQueue(max_pending=0)
