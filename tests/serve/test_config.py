"""ServeConfig: the server's limits, declared once; `duomodal serve`'s flags derive from it."""

from __future__ import annotations

import pytest

from duomodal.cli import build_parser
from duomodal.serve.config import ServeConfig


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"max_generate": 0}, "--max-generate must be at least 1, got 0"),
        ({"max_decodes": 0}, "--max-decodes must be at least 1, got 0"),
        ({"max_pending_jobs": 40}, "--max-jobs must be from 1 to 32, got 40"),
        ({"max_pending_jobs": 2, "max_jobs_per_client": 3}, "--max-jobs-per-client must be from 1 to --max-jobs (2), got 3"),
        ({"job_max_age_s": 0.0}, "--job-max-age must be above 0 seconds, got 0.0"),
        ({"thumb_size": 8}, "thumb_size must be at least 16, got 8"),
        ({"max_upload_bytes": 0}, "max_upload_bytes must be at least 1, got 0"),
    ],
)
def test_bad_limits_are_refused_naming_the_flag_or_field(changes, message):
    with pytest.raises(ValueError) as error:
        ServeConfig(**changes)
    assert str(error.value) == message


def test_the_serve_flags_default_to_the_config():
    args = build_parser().parse_args(["serve", "--index", "i"])
    defaults = ServeConfig()
    for flag, name, default, _ in ServeConfig.flags():
        assert getattr(args, name) == default == getattr(defaults, name), flag
    assert [flag for flag, *_ in ServeConfig.flags()] == [
        "--max-generate", "--max-jobs", "--max-jobs-per-client", "--job-max-age", "--max-decodes"]
