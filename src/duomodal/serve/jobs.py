"""Background jobs for slow work (image generation): one worker thread, progress, bounded memory.

A request submits a job and gets its id at once; the page polls the job for progress and, when it
is done, fetches the images. One job runs at a time (a model is not shared between threads and
the CPU has few cores); at most `max_pending` wait, and only the last `max_kept` are remembered.
The worker is a daemon thread and a running job stops at its next progress report once the queue
is shut down, so stopping the server never waits for a long generation.
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

from PIL import Image

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (steps done, steps in all)


class QueueFullError(RuntimeError):
    """Too many jobs are waiting; the client should retry later."""


class JobCancelled(RuntimeError):
    """Raised inside a running job when the queue shuts down."""


@dataclass
class JobOutput:
    images: list[Image.Image]  # best first when scored
    scores: list[float] | None
    score_kind: str | None = None  # "clip": CLIP similarity to the prompt; "fit": model log-likelihood


@dataclass
class Job:
    id: str
    kind: str
    prompt: str
    status: str = "queued"  # queued | running | done | failed
    done: int = 0
    total: int = 0
    error: str | None = None
    output: JobOutput | None = None
    created: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> bool:
        return self.status in ("done", "failed")

    @property
    def progress(self) -> float:
        if self.status == "done":
            return 1.0
        if self.total <= 0:
            return 0.0
        return min(1.0, max(0.0, self.done / self.total))


class JobQueue:
    def __init__(self, max_pending: int = 4, max_kept: int = 32):
        if max_pending < 1 or max_kept < max_pending:
            raise ValueError(
                f"max_pending={max_pending}, max_kept={max_kept}: need 1 <= max_pending <= max_kept"
            )
        self.max_pending = max_pending
        self.max_kept = max_kept
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[Job, Callable[[Progress], JobOutput]] | None] = queue.Queue()
        self._stopping = threading.Event()
        self._worker = threading.Thread(target=self._work, name="duomodal-job", daemon=True)
        self._worker.start()

    def submit(self, kind: str, prompt: str, work: Callable[[Progress], JobOutput]) -> Job:
        """Queue `work(progress)`; raise QueueFullError when `max_pending` jobs already wait."""
        with self._lock:
            waiting = sum(1 for job in self._jobs.values() if not job.finished)
            if waiting >= self.max_pending:
                raise QueueFullError(
                    f"{waiting} generation jobs are already queued or running: "
                    "try again when one has finished"
                )
            job = Job(id=uuid.uuid4().hex, kind=kind, prompt=prompt)
            self._jobs[job.id] = job
            self._forget_old_locked()
        self._queue.put((job, work))
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def shutdown(self) -> None:
        """Stop: queued jobs never start, a running one stops at its next progress report."""
        self._stopping.set()
        self._queue.put(None)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None or self._stopping.is_set():
                return
            self._run(*item)

    def _forget_old_locked(self) -> None:
        excess = len(self._jobs) - self.max_kept
        for job_id in [j.id for j in self._jobs.values() if j.finished][: max(0, excess)]:
            del self._jobs[job_id]

    def _run(self, job: Job, work: Callable[[Progress], JobOutput]) -> None:
        def progress(done: int, total: int) -> None:
            if self._stopping.is_set():
                raise JobCancelled("the server is shutting down")
            job.done, job.total = int(done), int(total)

        job.status = "running"
        try:
            output = work(progress)
        except JobCancelled as e:
            job.error = str(e)
            job.status = "failed"
        except ValueError as e:  # a request the library refused: the message is for the user
            job.error = str(e)
            job.status = "failed"
        except Exception as e:  # a bug or an exhausted machine: keep the server alive, log it
            logger.exception("job %s (%s) failed", job.id, job.kind)
            job.error = f"generation failed: {type(e).__name__}: {e}"
            job.status = "failed"
        else:
            job.output = output
            if job.total == 0:
                job.total = job.done = 1
            job.status = "done"
