"""Fuzzing the real server: hypothesis-generated task arrays and raw bodies over HTTP and WebSocket, and
schemathesis against the server's own OpenAPI document. Bounded (about a minute, derandomized so CI runs
the same cases every time); `benchmarks/fuzz_server.py` runs the same strategies for as long as you like."""

from __future__ import annotations

import hostile
import pytest
import schemathesis
from conftest import API_KEY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


# The key schemathesis uses on the OpenAI routes: one task a minute, so that the few valid requests among its
# cases (a generation of up to 10 images at up to 50 steps) cost one generation, not minutes.
OPENAI_KEY = "fuzz-openai-key-0123456789abcdef"


@pytest.fixture(scope="module")
def fuzz_server(start_server, tmp_path_factory):
    # Valid generated tasks queue behind one slot (the rest get 429), and shutdown does not wait for them.
    tenants = tmp_path_factory.mktemp("fuzz-tenants") / "tenants.toml"
    tenants.write_text(f'[[tenant]]\nname = "fuzz"\nkey = "{API_KEY}"\nadmin = true\n'
                       f'[[tenant]]\nname = "openai"\nkey = "{OPENAI_KEY}"\nmax_per_minute = 1\n')
    return start_server("--tenants", str(tenants), "--max-queue", "1", "--poll-wait", "0", "--shutdown-timeout", "1",
                        "--image-ttl", "600")


@pytest.fixture(scope="module")
def keepalive(fuzz_server):
    client = hostile.Http("127.0.0.1", fuzz_server.port, API_KEY)
    yield client
    client.close()


@pytest.fixture(scope="module")
def socket(fuzz_server):
    s = hostile.Socket(fuzz_server.url.replace("http", "ws") + "/v1", API_KEY)
    yield s
    s.close()


@FUZZ
@given(tasks=hostile.task_arrays)
def test_http_task_arrays(keepalive, tasks):
    hostile.http_tasks(keepalive, tasks)


@FUZZ
@given(body=hostile.raw_bodies)
def test_http_raw_bodies(keepalive, body):
    hostile.http_raw(keepalive, body)


@settings(FUZZ, max_examples=50)
@given(tasks=hostile.task_arrays)
def test_http_without_a_key(keepalive, tasks):
    hostile.http_tasks(keepalive, tasks, key=None)


@FUZZ
@given(tasks=hostile.task_arrays)
def test_websocket_task_arrays(socket, tasks):
    hostile.ws_tasks(socket, tasks)


@settings(FUZZ, max_examples=80)
@given(body=hostile.raw_bodies)
def test_websocket_raw_frames(socket, body):
    hostile.ws_raw(socket, body)


def test_endpoints_fine_after_fuzzing(fuzz_server):
    # Runs after the fuzz tests above (file order): nothing they sent broke the server.
    hostile.check_still_fine(fuzz_server.url)
    log = fuzz_server.log()
    assert "Traceback" not in log and "internalServerError" not in log


@pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")  # schemathesis' own
def test_openapi_conformance(fuzz_server):
    """schemathesis, positive and negative cases for every operation of /openapi.json: no 5xx, and every answer
    (status, content type, body) is one the schema describes. (Its pytest plugin's lazy loader does not run on
    this pytest, so its strategies are driven by hypothesis directly.)"""
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    cases = st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

    @settings(FUZZ, max_examples=200)
    @given(case=cases)
    def call(case):
        key = OPENAI_KEY if case.path.startswith("/v1/images/") else API_KEY
        case.call_and_validate(headers={"Authorization": f"Bearer {key}"}, checks=checks, timeout=120)

    call()


def test_endpoints_fine_after_schemathesis(fuzz_server):
    hostile.check_still_fine(fuzz_server.url)
