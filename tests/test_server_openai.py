"""The OpenAI-compatible API with the real `openai` client against a live `dsv4 serve` (tiny model) on loopback.

One server per module, with an API key (so every client call also proves bearer auth).
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from dsv4.runtime.server.launch import start_server
from openai import AsyncOpenAI, OpenAI

KEY = "test-key-123"


@pytest.fixture(scope="module")
def server():
    sp = start_server(["--max-num-seqs", "64", "--max-queue", "256"], env={"DSV4_API_KEY": KEY})
    yield sp
    assert sp.stop() == 0, sp.log()[-3000:]


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def raw(server, path: str, body=None, key: str | None = KEY, content: bytes | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if content is not None:
        headers["Content-Type"] = "application/json"
        return httpx.post(server.base_url + path, content=content, headers=headers, timeout=60)
    return httpx.post(server.base_url + path, json=body, headers=headers, timeout=60)


def metric_values(server, name: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    body = httpx.get(server.base_url + "/metrics").text
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            if s.name == name:
                out[json.dumps(s.labels, sort_keys=True)] = s.value
    return out


def test_models_health_openapi_and_auth(server, client, model):
    assert model == "tiny"
    assert httpx.get(server.base_url + "/health").status_code == 200
    r = httpx.get(server.base_url + "/ready")
    assert r.status_code == 200 and r.json()["ready"] is True
    spec = httpx.get(server.base_url + "/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(spec["paths"])
    r = raw(server, "/v1/completions", {"prompt": "hi", "max_tokens": 1}, key=None)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    bad = OpenAI(base_url=server.base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_completions_text_token_ids_echo_logprobs(client, model, server):
    r = client.completions.create(model=model, prompt="hello world", max_tokens=5, temperature=0, logprobs=3)
    c = r.choices[0]
    assert r.usage.completion_tokens == 5 and r.usage.prompt_tokens > 0
    assert c.finish_reason == "length"
    assert len(c.logprobs.tokens) == 5 and len(c.logprobs.token_logprobs) == 5
    assert all(len(t) <= 3 for t in c.logprobs.top_logprobs)
    assert all(lp <= 0 for lp in c.logprobs.token_logprobs)
    r_ids = client.completions.create(model=model, prompt="hello world", max_tokens=5, temperature=0, echo=True,
                                      logprobs=1)
    e = r_ids.choices[0]
    assert e.text.startswith("hello world") and e.text[len("hello world"):] == c.text
    n_prompt = r_ids.usage.prompt_tokens
    assert len(e.logprobs.tokens) == n_prompt + 5
    assert e.logprobs.token_logprobs[0] is None and all(x is not None for x in e.logprobs.token_logprobs[1:])
    tok_prompt = [5, 6, 7, 8, 9, 10]
    a = client.completions.create(model=model, prompt=tok_prompt, max_tokens=4, temperature=0)
    b = client.completions.create(model=model, prompt=[tok_prompt], max_tokens=4, temperature=0)
    assert a.choices[0].text == b.choices[0].text and a.usage.prompt_tokens == len(tok_prompt)
    two = client.completions.create(model=model, prompt=["hello world", "the cache"], max_tokens=5, temperature=0)
    one = client.completions.create(model=model, prompt="the cache", max_tokens=5, temperature=0)
    assert [ch.text for ch in two.choices] == [c.text, one.choices[0].text]
    assert [ch.index for ch in two.choices] == [0, 1]
    assert two.usage.completion_tokens == 10

def test_chat_stream_matches_non_stream_and_ends_with_usage(client, model):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is a cache?"}]
    full = client.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0)
    assert full.choices[0].message.role == "assistant"
    assert full.usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    lp = client.chat.completions.create(model=model, messages=msgs, max_tokens=4, temperature=0, logprobs=True,
                                        top_logprobs=2)
    content = lp.choices[0].logprobs.content
    assert len(content) == 4 and all(len(x.top_logprobs) == 2 for x in content)
    assert content[0].top_logprobs[0].logprob >= content[0].logprob - 1e-6  # greedy picks the top token


def test_stop_strings(client, model):
    base = client.completions.create(model=model, prompt="the model cache", max_tokens=16, temperature=0).choices[0]
    text = base.text
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if "\ufffd" not in text[i:i + 2]
                and text[i:i + 2].strip())
    cut = client.completions.create(model=model, prompt="the model cache", max_tokens=16, temperature=0,
                                    stop=[stop]).choices[0]
    assert cut.text == text[: text.find(stop)]
    assert cut.finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model=model, prompt="the model cache", max_tokens=16, temperature=0, stop=stop, stream=True) if ch.choices)
    assert streamed == cut.text


def test_seed_reproducibility_and_n(client, model):
    kw = dict(model=model, prompt="sampling test", max_tokens=10, temperature=1.0)
    a = client.completions.create(seed=42, **kw).choices[0].text
    b = client.completions.create(seed=42, **kw).choices[0].text
    c = client.completions.create(seed=43, **kw).choices[0].text
    assert a == b and a != c
    n2 = client.completions.create(seed=42, n=2, **kw)
    assert len(n2.choices) == 2 and n2.choices[0].text == a and n2.choices[1].text != a
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=6,
                                          temperature=0.9, seed=5, n=3, extra_body={"ignore_eos": True})
    assert [ch.index for ch in chat.choices] == [0, 1, 2] and chat.usage.completion_tokens == 18
    assert all(ch.finish_reason == "length" for ch in chat.choices)


def test_64_concurrent_streams_equal_sequential(server, model):
    prompts = [f"request number {i} about {w}" for i, w in enumerate(
        ["cache", "kernel", "router", "token", "layer", "window", "expert", "budget",
         "server", "prefix", "decode", "batch", "memory", "python", "block", "model"])]
    sync = OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    ref = {p: sync.completions.create(model=model, prompt=p, max_tokens=8, temperature=0).choices[0].text
           for p in prompts}

    async def stream(ac: AsyncOpenAI, p: str) -> str:
        parts = []
        async for ch in await ac.completions.create(model=model, prompt=p, max_tokens=8, temperature=0,
                                                    stream=True):
            if ch.choices:
                parts.append(ch.choices[0].text)
        return "".join(parts)

    async def main() -> list[str]:
        ac = AsyncOpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0, timeout=300,
                         http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=100), timeout=300))
        return await asyncio.gather(*(stream(ac, prompts[i % 16]) for i in range(64)))

    t0 = time.monotonic()
    got = asyncio.run(main())
    assert len(got) == 64
    assert got == [ref[prompts[i % 16]] for i in range(64)], f"took {time.monotonic() - t0:.1f}s"


def test_disconnect_mid_stream_frees_cache(server, model):
    def used() -> float:
        return sum(metric_values(server, "dsv4_cache_pool_used_bytes").values())

    baseline = used()
    aborted0 = sum(v for k, v in metric_values(server, "vllm:request_success_total").items() if "abort" in k)
    with httpx.stream("POST", server.base_url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": model, "prompt": "a stream that is cut", "max_tokens": 2000, "stream": True,
                            "ignore_eos": True}, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data:"):
                seen += 1
            if seen == 3:
                assert used() > baseline  # the request holds blocks while it runs
                break
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and used() != baseline:
        time.sleep(0.05)
    assert used() == baseline
    assert sum(metric_values(server, "vllm:num_requests_running").values()) == 0
    aborted = sum(v for k, v in metric_values(server, "vllm:request_success_total").items() if "abort" in k)
    assert aborted == aborted0 + 1


@pytest.mark.parametrize("body, status, needle", [
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**9}, 400, "max_model_len"),
    ({"prompt": "x", "max_tokens": 1, "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "x", "max_tokens": 1, "bogus_field": 1}, 400, "bogus_field"),
    ({"prompt": "x", "max_tokens": 1, "logprobs": 21}, 400, "logprobs"),
    ({"prompt": [], "max_tokens": 1}, 400, "prompt"),
    ({"prompt": [99999], "max_tokens": 1}, 400, "token ids"),
    ({"prompt": [2**70], "max_tokens": 1, "echo": True}, 400, "token ids"),
    ({"prompt": [[1, 2], [99999]], "max_tokens": 1, "echo": True, "logprobs": 1}, 400, "token ids"),
    ({"max_tokens": 1}, 400, "prompt"),
    ({"prompt": "x", "max_tokens": 1, "model": "gpt-9"}, 404, "gpt-9"),
    ({"prompt": "x", "max_tokens": 1, "n": 2, "best_of": 3}, 400, "best_of"),
])
def test_bad_completion_inputs_name_the_problem(server, body, status, needle):
    r = raw(server, "/v1/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and set(err) == {"message", "type", "param", "code"}


def test_bad_chat_inputs_and_context_limit(server, client, model):
    r = raw(server, "/v1/chat/completions", content=b'{"messages": [')
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = raw(server, "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and "messages.0.role" in r.json()["error"]["message"]
    r = raw(server, "/v1/chat/completions", {"messages": []})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    limit = client.models.list().data[0].model_extra["max_model_len"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt=[7] * (limit + 1), max_tokens=1)
    assert "maximum context length" in str(e.value) and str(limit) in str(e.value)
