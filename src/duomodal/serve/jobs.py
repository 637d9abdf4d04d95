"""Background jobs for slow work (image generation): one worker thread, progress, previews,
cancelling, and bounded memory.

A request submits a job and gets its id at once; the page polls the job for progress, partial
previews and, when it is done, the images. One job runs at a time (a model is not shared between
threads and the CPU has few cores). At most `max_pending` jobs wait or run, at most
`max_per_client` of them from one client; finished jobs are forgotten after `max_age_s` seconds,
or sooner when more than `max_kept` are remembered or their images take more than
`max_kept_bytes`.

A job's work gets a `JobControl`: it reports progress and previews through it, and every report
raises `JobCancelled` once the job was cancelled (`cancel`) or the queue shut down, so a running
job stops at its next sampling row or batch. The worker survives whatever a job raises: the job
is marked failed with a message and the next one runs.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from duomodal.serve.config import MAX_KEPT_JOBS, ServeConfig

logger = logging.getLogger(__name__)

UNFINISHED = ("queued", "running", "cancelling")
FINISHED = ("done", "failed", "cancelled")


class QueueFullError(RuntimeError):
    """Too many jobs are waiting (in all, or from this client); the client should retry later."""


class JobCancelled(RuntimeError):
    """Raised inside a running job when it was cancelled or the queue shuts down."""


class JobFinishedError(RuntimeError):
    """The job has already finished: there is nothing left to cancel."""


@dataclass
class JobOutput:
    images: list[Image.Image]  # best first when scored
    scores: list[float] | None
    score_kind: str | None = None  # "clip": CLIP similarity to the prompt; "fit": model log-likelihood
    seeds: list[int] | None = None  # the seed of each image: that seed alone reproduces it
    sample_indices: list[int] | None = None  # each image's position in sampling order
    keep: int | None = None  # the first `keep` images are the result; the rest are the other samples


@dataclass
class JobPreview:
    """Partial images of the samples being drawn now: `images[i]` is sample `first + i`, with its
    first `rows` token rows (of `grid_rows`) drawn."""

    images: list[Image.Image]
    first: int
    rows: int
    grid_rows: int
    version: int


@dataclass
class Job:
    id: str
    kind: str
    prompt: str
    client: str = ""
    settings: dict[str, Any] = field(default_factory=dict)  # what reproduces the job
    status: str = "queued"  # queued | running | cancelling | done | failed | cancelled
    done: int = 0
    total: int = 0
    error: str | None = None
    output: JobOutput | None = None
    preview: JobPreview | None = None
    created: float = field(default_factory=time.time)  # wall clock, for people
    finished_at: float | None = None  # the queue's clock

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @property
    def image_bytes(self) -> int:
        """Memory the job's images take (decoded), results and last preview."""
        images = list(self.output.images) if self.output is not None else []
        images += list(self.preview.images) if self.preview is not None else []
        return sum(image.width * image.height * len(image.getbands()) for image in images
                   if isinstance(image, Image.Image))

    @property
    def progress(self) -> float:
        if self.status == "done":
            return 1.0
        if self.total <= 0:
            return 0.0
        return min(1.0, max(0.0, self.done / self.total))


class JobControl:
    """What a running job's work is handed: progress and preview reports, each of which raises
    `JobCancelled` once the job should stop."""

    def __init__(self, job: Job, stopping: threading.Event):
        self._job = job
        self._stopping = stopping

    def check(self) -> None:
        """Raise JobCancelled if the job was cancelled or the server is stopping."""
        if self._stopping.is_set():
            raise JobCancelled("the server is shutting down")
        if self._job.status == "cancelling":
            raise JobCancelled("cancelled")

    def progress(self, done: int, total: int) -> None:
        self.check()
        self._job.done, self._job.total = int(done), int(total)

    def preview(self, images: list[Image.Image], *, first: int, rows: int, grid_rows: int) -> None:
        self.check()
        version = 1 if self._job.preview is None else self._job.preview.version + 1
        self._job.preview = JobPreview(list(images), int(first), int(rows), int(grid_rows), version)


Work = Callable[[JobControl], JobOutput]


class JobQueue:
    def __init__(self, max_pending: int = ServeConfig.max_pending_jobs,
                 max_per_client: int = ServeConfig.max_jobs_per_client, max_kept: int = MAX_KEPT_JOBS,
                 max_age_s: float = ServeConfig.job_max_age_s, max_kept_bytes: int = 256 * 1024 * 1024,
                 clock: Callable[[], float] = time.monotonic):
        if not 1 <= max_pending <= max_kept:
            raise ValueError(
                f"max_pending={max_pending}, max_kept={max_kept}: need 1 <= max_pending <= max_kept"
            )
        if max_per_client < 1 or not max_age_s > 0:
            raise ValueError(
                f"max_per_client={max_per_client}, max_age_s={max_age_s}: need at least 1 and more than 0"
            )
        self.max_pending = max_pending
        self.max_per_client = max_per_client
        self.max_kept = max_kept
        self.max_age_s = max_age_s
        self.max_kept_bytes = max_kept_bytes
        self._clock = clock
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[Job, Work] | None] = queue.Queue()
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None
        self._ensure_worker()

    def submit(self, kind: str, prompt: str, work: Work, *, client: str = "",
               settings: dict[str, Any] | None = None) -> Job:
        """Queue `work(control)`; raise QueueFullError when `max_pending` jobs already wait or run,
        or `max_per_client` of them are from `client`."""
        with self._lock:
            self._forget_old_locked()
            unfinished = [job for job in self._jobs.values() if not job.finished]
            if len(unfinished) >= self.max_pending:
                raise QueueFullError(
                    f"{len(unfinished)} generation jobs are already queued or running: "
                    "try again when one has finished"
                )
            mine = sum(1 for job in unfinished if job.client == client)
            if mine >= self.max_per_client:
                raise QueueFullError(
                    f"you already have {mine} generation jobs queued or running (at most "
                    f"{self.max_per_client} per client): wait for one to finish, or cancel one"
                )
            job = Job(id=uuid.uuid4().hex, kind=kind, prompt=prompt, client=client, settings=dict(settings or {}))
            self._jobs[job.id] = job
            self._forget_old_locked()
        self._ensure_worker()
        self._queue.put((job, work))
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            self._forget_old_locked()
            return self._jobs.get(job_id)

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a job: a queued one never starts, a running one stops at its next report.

        Returns the job (None if unknown); raises JobFinishedError when it has already finished.
        """
        with self._lock:
            self._forget_old_locked()
            job = self._jobs.get(job_id)
            if job is None:
                return None
            if job.finished:
                raise JobFinishedError(f"job {job_id} has already finished ({job.status}): nothing to cancel")
            if job.status == "queued":
                self._finish_locked(job, "cancelled", "cancelled before it started")
            else:
                job.status = "cancelling"
            return job

    def shutdown(self) -> None:
        """Stop: queued jobs never start, a running one stops at its next report."""
        self._stopping.set()
        self._queue.put(None)

    def _ensure_worker(self) -> None:
        """Start a worker if none is alive (one that ended on KeyboardInterrupt/SystemExit is replaced)."""
        with self._lock:
            if self._stopping.is_set() or (self._worker is not None and self._worker.is_alive()):
                return
            self._worker = threading.Thread(target=self._work, name="duomodal-job", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None or self._stopping.is_set():
                return
            job, work = item
            if job.status != "queued":  # cancelled while it waited
                continue
            self._run(job, work)

    def _finish_locked(self, job: Job, status: str, error: str | None = None) -> None:
        # The last preview stays readable until the job is forgotten, so a page that saw its URL
        # just before the job finished can still load it; the job's JSON no longer lists it.
        job.status, job.error = status, error
        job.finished_at = self._clock()

    def _forget_old_locked(self) -> None:
        """Forget finished jobs, oldest first, past `max_age_s`, past `max_kept` jobs, or while
        the images of the finished ones take more than `max_kept_bytes`."""
        now = self._clock()
        finished = [job for job in self._jobs.values() if job.finished]
        excess = len(self._jobs) - self.max_kept
        kept_bytes = sum(job.image_bytes for job in finished)
        for n, job in enumerate(finished):
            if n < excess or now - (job.finished_at or now) > self.max_age_s or kept_bytes > self.max_kept_bytes:
                kept_bytes -= job.image_bytes
                del self._jobs[job.id]

    def _finish(self, job: Job, status: str, error: str | None = None) -> None:
        with self._lock:
            self._finish_locked(job, status, error)

    def _run(self, job: Job, work: Work) -> None:
        with self._lock:
            if job.status != "queued":
                return
            job.status = "running"
        try:
            output = work(JobControl(job, self._stopping))
        except JobCancelled as e:
            self._finish(job, "cancelled" if job.status == "cancelling" else "failed", str(e))
        except ValueError as e:  # a request the library refused: the message is for the user
            self._finish(job, "failed", str(e))
        except (KeyboardInterrupt, SystemExit) as e:  # the process is being stopped: let it stop
            with self._lock:
                # This worker is gone from here on, before anyone can see the job finished: a submit
                # that follows must start another worker, not count on this one while it unwinds.
                if self._worker is threading.current_thread():
                    self._worker = None
                self._finish_locked(job, "failed", f"generation stopped: {type(e).__name__}")
            raise
        except BaseException as e:  # a bug, an exhausted machine, a stray GeneratorExit: keep serving
            logger.exception("job %s (%s) failed", job.id, job.kind)
            self._finish(job, "failed", f"generation failed: {type(e).__name__}: {e}")
        else:
            if job.status == "cancelling":  # it finished before it looked at the flag again
                self._finish(job, "cancelled", "cancelled")
                return
            job.output = output
            if job.total == 0:
                job.total = job.done = 1
            self._finish(job, "done")
