"""The API contract, checked as a client would meet it: schemathesis (its CLI, every check: server
errors, status codes, content types, response schemas, schema-valid requests accepted,
schema-violating requests refused, Allow headers...) against a live server on 127.0.0.1, with the
small fakes of conftest.py. Bounded: deterministic generation, 20 examples per operation.

The settings are in contract/schemathesis.toml; contract/hooks.py makes the upload parts real
images of the media types the schema names. The coverage phase leaves out the two text-search
operations: generating its boundary cases (500-character strings) for the query-syntax pattern
takes schemathesis over a minute; the other phases test them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from duomodal.serve.app import create_app
from duomodal.serve.config import ServeConfig

HERE = Path(__file__).parent
pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("schemathesis") is None and not Path(sys.executable).with_name("schemathesis").exists(),
                       reason="the schemathesis CLI is not installed"),
]


@pytest.fixture
def live_url(fake_index, fake_clip, fake_generator, serving):
    fake_generator.seconds_per_image = 0.0
    fake_generator.max_num = 6  # below the default nums (16 and 8): a request without num is still valid
    with serving(create_app(fake_index, fake_clip, fake_generator, ServeConfig(max_upload_bytes=64 * 1024))) as url:
        yield url


def schemathesis(url: str, *options: str) -> subprocess.CompletedProcess:
    command = shutil.which("schemathesis") or str(Path(sys.executable).with_name("schemathesis"))
    root = HERE.parents[1]
    env = dict(os.environ, SCHEMATHESIS_HOOKS="tests.serve.contract.hooks", NO_COLOR="1",
               PYTHONPATH=os.pathsep.join([str(root / "src"), str(root), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [command, "--config-file", str(HERE / "contract" / "schemathesis.toml"), "run", f"{url}/openapi.json",
         "--checks", "all", *options],
        capture_output=True, text=True, env=env, cwd=root, timeout=110,
    )


def test_schemathesis_with_every_check_finds_nothing(live_url):
    runs = [
        schemathesis(live_url, "--phases", "examples,fuzzing,stateful"),
        schemathesis(live_url, "--phases", "coverage", "--exclude-name", "GET /api/search",
                     "--exclude-name", "POST /api/search"),
    ]
    for run in runs:
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
        assert " passed" in run.stdout and "failed" not in run.stdout.split("SUMMARY")[-1]
