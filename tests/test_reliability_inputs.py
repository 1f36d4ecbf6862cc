"""Bad input against the live server (in-process, tiny model, loopback HTTP): every case gets a 4xx in OpenAI's
error shape whose message names the field and the limit, quickly (never a hang), and the server keeps serving.

Policy for unknown fields: rejected with 400 naming the field (strict API; a typo never silently changes
sampling). Types are strict too: "5" is not an integer, 1 is not a boolean (2.0 is an integer: JSON Schema).
"""

from __future__ import annotations

import socket
import time

import httpx
import pytest
from dsv4.runtime.server.config import ServeConfig
from dsv4.runtime.server.inprocess import start_in_process

MAX_LEN = 512  # room for the default V4 chat prompt (thinking mode, "high" effort prompt: 289 tiny tokens)
MAX_QUEUE = 8
BODY_LIMIT = 32 * 1024


@pytest.fixture(scope="module")
def srv():
    cfg = ServeConfig.build({}, {"max_model_len": MAX_LEN, "max_queue": MAX_QUEUE, "max_body_bytes": BODY_LIMIT,
                                 "num_blocks": 64})
    s = start_in_process(cfg)
    s.state.body_timeout_s = 2.0
    yield s
    s.stop()


def post(srv, body=None, content: bytes | None = None, path: str = "/v1/completions", **kw) -> httpx.Response:
    t0 = time.monotonic()
    if content is not None:
        r = httpx.post(srv.base_url + path, content=content, timeout=20,
                       headers={"Content-Type": "application/json", **kw.pop("headers", {})}, **kw)
    else:
        r = httpx.post(srv.base_url + path, json=body, timeout=20, **kw)
    assert time.monotonic() - t0 < 15, "the server took too long to refuse"
    return r


def error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    return err


CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("path, body, param, needles", [
    # context limit: prompt alone, and prompt + max_tokens
    ("/v1/completions", {"prompt": [5] * (MAX_LEN + 1), "max_tokens": 1}, "prompt",
     [f"maximum context length is {MAX_LEN}", "max_model_len"]),
    ("/v1/completions", {"prompt": "x", "max_tokens": MAX_LEN}, "max_tokens", [f"{MAX_LEN}", "max_model_len"]),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 10**12}, "max_tokens", ["max_model_len", str(10**12)]),
    # negative / zero / huge values
    ("/v1/completions", {"prompt": "x", "max_tokens": -5}, "max_tokens", ["greater than or equal to 1"]),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 0}, "max_completion_tokens",
     ["greater than or equal to 1"]),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1, "n": 10**6}, "n", ["less than or equal to 16"]),
    ("/v1/chat/completions", {**CHAT, "n": 17}, "n", ["16"]),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1, "logprobs": 21}, "logprobs", ["20"]),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1, "temperature": 1e300}, "temperature", ["2"]),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1, "priority": 2**40}, "priority", ["2147483647"]),
    ("/v1/completions", {"prompt": [2**40], "max_tokens": 1}, "prompt", ["[0, 1024)"]),
    ("/v1/completions", {"prompt": ["a"] * (MAX_QUEUE + 1), "max_tokens": 1}, "prompt", [f"max_queue={MAX_QUEUE}"]),
    # unknown fields (strict) and wrong types
    ("/v1/completions", {"prompt": "x", "max_tokens": 1, "temprature": 0}, "temprature", ["unknown field"]),
    ("/v1/chat/completions", {**CHAT, "functions": []}, "functions", ["unknown field"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "colour": 1}]}, "messages.0.colour",
     ["unknown field"]),
    ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, "max_tokens", ["valid integer"]),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2.5}, "max_tokens", ["valid integer"]),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1, "stream": "yes"}, "stream", ["valid boolean"]),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1, "n": True}, "n", ["valid integer"]),
    ("/v1/completions", {"prompt": {"text": "x"}, "max_tokens": 1}, "prompt",
     ["expected one of str, list[str], list[int], list[list"]),
    ("/v1/chat/completions", {"messages": "hello"}, "messages", ["valid list"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content",
     ["expected one of str, list[ContentPart]"]),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "xml"}}, "response_format",
     ["'xml'", "'text'", "'json_object'", "'json_schema'"]),
])
def test_bad_field_names_field_and_limit(srv, path, body, param, needles):
    err = error(post(srv, body, path=path), 400)
    assert err["param"] == param, err
    assert all(n in err["message"] for n in needles), err["message"]


@pytest.mark.parametrize("content, needle", [
    (b'{"prompt": "x", "max_tokens": ', "malformed JSON"),
    (b"\xff\xfe\x00", "malformed JSON body: cannot be parsed"),
    (b"", "request body required"),
    (b'["prompt"]', "request body: Input should be a valid dictionary"),
    (b'{"prompt": ' + b"[" * 10000 + b"]" * 10000 + b"}", "nested too deeply"),  # deeper than the parser
])
def test_malformed_bodies(srv, content, needle):
    assert needle in error(post(srv, content=content), 400)["message"]


def test_integral_float_is_an_integer(srv):
    r = post(srv, {"prompt": "x", "max_tokens": 2.0, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2


def test_oversized_body_with_content_length_413(srv):
    big = {"prompt": "x" * (BODY_LIMIT + 10), "max_tokens": 1}
    err = error(post(srv, big), 413)
    assert f"the limit is {BODY_LIMIT} bytes" in err["message"] and "max_body_bytes" in err["message"]


def test_oversized_chunked_body_413(srv):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(BODY_LIMIT // 1024 + 4):
            yield b"y" * 1024
        yield b'", "max_tokens": 1}'

    err = error(post(srv, content=chunks()), 413)  # no Content-Length: counted while streaming
    assert f"the limit is {BODY_LIMIT} bytes" in err["message"]


def test_stalled_body_408_not_a_hang(srv):
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        t0 = time.monotonic()
        reply = s.recv(4096).decode(errors="replace")
        assert time.monotonic() - t0 < 8
    assert reply.startswith("HTTP/1.1 408") and "not received within 2 s" in reply, reply


def test_bad_content_length_400(srv):
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n")
        reply = s.recv(4096).decode(errors="replace")
    assert reply.split(" ")[1] in ("400", "413"), reply


def test_still_serving_after_the_abuse(srv):
    r = post(srv, {"prompt": "still alive", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    assert httpx.get(srv.base_url + "/health").status_code == 200

    def snap(eng):
        eng.cache.check_invariants()
        return len(eng.requests), eng.cache.stats().running_requests

    assert srv.engine.call(snap) == (0, 0)
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(srv.base_url + "/metrics").text
    by_code = {s.labels["code"]: s.value for fam in text_string_to_metric_families(text)
               for s in fam.samples if s.name == "dsv4_request_errors_total"}
    assert by_code["413"] >= 2 and by_code["408"] >= 1 and by_code["400"] >= 25, by_code
