"""Fuzz the API from its own OpenAPI schema (schemathesis, in-process ASGI, deterministic and
bounded: 30 examples per operation and mode): valid and invalid requests alike must never get a
5xx, and the answers must match the schema (status codes, content types, bodies)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from duomodal.serve.app import create_app
from duomodal.serve.config import ServeConfig
from duomodal.serve.security import AccessPolicy

pytestmark = pytest.mark.timeout(180)  # generous: a loaded 2-core machine runs these many times slower

OPERATIONS = [
    ("GET", "/health"),
    ("GET", "/api/search"),
    ("POST", "/api/search"),
    ("POST", "/api/search/image"),
    ("GET", "/api/similar/{image_id}"),
    ("GET", "/api/image/{image_id}"),
    ("GET", "/api/thumb/{image_id}"),
    ("POST", "/api/generate"),
    ("POST", "/api/edit"),
    ("GET", "/api/jobs/{job_id}"),
    ("GET", "/api/jobs/{job_id}/images/{n}"),
    ("POST", "/api/complete"),
    ("GET", "/api/generator"),
    ("DELETE", "/api/jobs/{job_id}"),
    ("GET", "/api/jobs/{job_id}/events"),
    ("GET", "/api/jobs/{job_id}/preview/{n}"),
]
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture
def api_schema(fake_index, fake_clip, fake_generator):
    fake_generator.seconds_per_image = 0.0
    # schemathesis calls the app with the Host "testserver".
    app = create_app(fake_index, fake_clip, fake_generator,
                     ServeConfig(max_upload_bytes=64 * 1024, access=AccessPolicy.make(["testserver"])))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_every_operation_is_fuzzed(api_schema):
    labels = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert labels == set(OPERATIONS)


CASES = [
    pytest.param(method, path, mode, id=f"{method} {path} {mode.value}")
    for method, path in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    # no parameters: nothing to make invalid
    if path not in ("/health", "/api/generator") or mode is GenerationMode.POSITIVE
]


@pytest.mark.parametrize("method, path, mode", CASES)
def test_no_server_errors_and_answers_match_the_schema(api_schema, method, path, mode):
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=30,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case):
        case.validate_response(case.call(), checks=CHECKS)

    check()
