"""schemathesis against the live server's own OpenAPI schema (tiny model, in-process server on loopback):
no 5xx for any generated request (valid or not), and every response conforms to the schema (status code
documented, content type, body shape). The number of examples is bounded so the run stays under a minute.
"""

from __future__ import annotations

import os
import re

import pytest
import schemathesis
from dsv4.runtime.server.config import ServeConfig
from dsv4.runtime.server.inprocess import start_in_process
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

# per operation and generation mode. CI draws the same examples every run (derandomized) so a landing never
# depends on luck; DSV4_FUZZ_EXAMPLES=500 DSV4_FUZZ_RANDOM=1 explores new ones locally.
MAX_EXAMPLES = int(os.environ.get("DSV4_FUZZ_EXAMPLES", "40"))
DERANDOMIZE = os.environ.get("DSV4_FUZZ_RANDOM", "") != "1"


@pytest.fixture(scope="module")
def live():
    # small limits keep every generated request cheap: at most 48 tokens per request, 8 prompts per batch
    cfg = ServeConfig.build({}, {"max_model_len": 48, "max_queue": 8, "max_num_seqs": 16,
                                 "max_body_bytes": 65536, "num_blocks": 64})
    srv = start_in_process(cfg)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def api_schema(live):
    return schemathesis.openapi.from_url(live.base_url + "/openapi.json")


# 400s a schema-valid request may still get: limits that depend on the running server (context length,
# vocabulary, queue) or rules across two fields. Each message names the field and the limit.
RUNTIME_LIMITS = re.compile(
    r"maximum context length|max_model_len|prompt token ids must be integers in|max_queue|"
    r"min_tokens must be in \[0, max_tokens|top_logprobs requires logprobs|best_of must equal n|"
    r"stop_token_ids must be in|tokens must be integers in|tool_choice|cannot compile this JSON schema|"
    r"tool call arguments|a developer message needs content")


def positive_accepted_unless_runtime_limit(ctx, response, case):
    """schemathesis' positive_data_acceptance, except for the documented runtime limits above."""
    if case.meta is None or not case.meta.generation.mode.is_positive or response.status_code < 400:
        return None
    if response.status_code in (404, 413, 429):  # unknown model name, body limit, queue full
        return None
    body = response.json() if response.status_code != 405 else {}
    msg = body.get("error", {}).get("message", "") if isinstance(body, dict) else ""
    assert response.status_code == 400 and RUNTIME_LIMITS.search(msg), (
        f"schema-valid request rejected with {response.status_code}: {response.text[:300]}")
    return None


def _operations(api_schema) -> list:
    return [r.ok() for r in api_schema.get_all_operations()]


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_api_conforms_and_never_5xx(api_schema, live, mode):
    """Every operation of the schema, MAX_EXAMPLES generated requests each: the default checks (no 5xx,
    status code / content type / headers / body conform; negative data is rejected)."""
    ops = _operations(api_schema)
    assert {op.path for op in ops} >= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"}
    for op in ops:
        if mode == GenerationMode.NEGATIVE and not len(op.body):
            continue  # nothing to make invalid in a GET without parameters
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=DERANDOMIZE,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        def run(case):
            case.call_and_validate(timeout=60, excluded_checks=[positive_data_acceptance],
                                   additional_checks=[positive_accepted_unless_runtime_limit])

        run()


def test_schema_run_left_the_engine_clean(live):
    """After the fuzzing (module order: runs last), nothing is left running or leaked in the cache."""
    import time

    deadline = time.monotonic() + 30
    while live.engine.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)

    def check(eng):
        eng.cache.check_invariants()
        return len(eng.requests), eng.cache.stats().running_requests

    assert live.engine.call(check) == (0, 0)
