"""The server's limits, declared once: `create_app` takes a `ServeConfig`, `duomodal serve`'s flags
(their names, defaults and help) are derived from its fields, and the job queue, the thumbnail
cache and the upload decoder take their defaults from it."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from duomodal.serve.security import AccessPolicy

MAX_KEPT_JOBS = 32  # jobs remembered (queued, running and finished): the most --max-jobs may be


def _limit(default: Any, help: str, flag: str | None = None) -> Any:
    """A field with the help of its command-line flag (`flag`: None = not offered on the command line)."""
    return field(default=default, metadata={"help": help, "flag": flag})


@dataclass(frozen=True)
class ServeConfig:
    max_generate: int = _limit(64, "most images one generation request may ask for", "--max-generate")
    max_pending_jobs: int = _limit(8, "generation jobs queued or running at once, all clients together",
                                   "--max-jobs")
    max_jobs_per_client: int = _limit(4, "generation jobs one client (peer address) may have queued or running",
                                      "--max-jobs-per-client")
    job_max_age_s: float = _limit(3600.0, "how long a finished job's results are kept, in seconds", "--job-max-age")
    max_decodes: int = _limit(2, "images decoded at once (uploads, thumbnails); bounds the decode memory",
                              "--max-decodes")
    max_upload_bytes: int = _limit(10 * 1024 * 1024, "largest upload accepted, in bytes")
    thumb_size: int = _limit(256, "longer side of a thumbnail, in pixels")
    thumb_cache_bytes: int = _limit(64 * 1024 * 1024, "memory the thumbnail cache may hold")
    query_cache_size: int = _limit(256, "query vectors remembered (typing a query again embeds it once)")
    reload_check_s: float = _limit(5.0, "how often to look whether the index changed on disk, in seconds")
    # which Host names are answered and whether a token is needed (default: loopback names, no token)
    access: AccessPolicy = field(default_factory=AccessPolicy)

    def __post_init__(self) -> None:
        """ValueError naming the setting (its flag, when it has one), the bound and the value."""
        for name in ("max_generate", "max_decodes", "max_upload_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{self.flag(name)} must be at least 1, got {getattr(self, name)}")
        if not 1 <= self.max_pending_jobs <= MAX_KEPT_JOBS:
            raise ValueError(f"{self.flag('max_pending_jobs')} must be from 1 to {MAX_KEPT_JOBS}, "
                             f"got {self.max_pending_jobs}")
        if not 1 <= self.max_jobs_per_client <= self.max_pending_jobs:
            raise ValueError(f"{self.flag('max_jobs_per_client')} must be from 1 to {self.flag('max_pending_jobs')} "
                             f"({self.max_pending_jobs}), got {self.max_jobs_per_client}")
        if not self.job_max_age_s > 0:
            raise ValueError(f"{self.flag('job_max_age_s')} must be above 0 seconds, got {self.job_max_age_s}")
        if self.thumb_size < 16:
            raise ValueError(f"thumb_size must be at least 16, got {self.thumb_size}")
        for name in ("thumb_cache_bytes", "query_cache_size", "reload_check_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be at least 0, got {getattr(self, name)}")

    @staticmethod
    def flag(name: str) -> str:
        """The command-line flag of a field, or the field's name when it has none."""
        return next(f.metadata.get("flag") or name for f in fields(ServeConfig) if f.name == name)

    @staticmethod
    def flags() -> list[tuple[str, str, Any, str]]:
        """(flag, field name, default, help) of each limit offered on the command line."""
        return [(f.metadata["flag"], f.name, f.default, f.metadata["help"]) for f in fields(ServeConfig)
                if f.metadata.get("flag")]
