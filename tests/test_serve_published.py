"""`dsv4 serve --model <published-layout checkpoint> --weights-dtype checkpoint` on CPU (issue 17): FP8 linears and
FP4 experts stay quantised in memory, the server answers chat through the OpenAI API, and `--tp 2` (two real
processes, gloo; every rank, rank 0 included, reads only its part) gives the same greedy tokens as `--tp 1`.
"""

from __future__ import annotations

import dataclasses

import pytest
from dsv4.runtime.checkpoint.published import write_published_checkpoint
from dsv4.runtime.checkpoint.random_init import random_tensors
from dsv4.runtime.server.launch import start_servers
from dsv4.runtime.tokenizer import write_tokenizer
from openai import OpenAI

from tests.model_utils import tiny_configs

pytestmark = pytest.mark.slow

COMMON = ["--device", "cpu", "--cache-budget-gib", "0.03125", "--expected-context", "512",
          "--max-num-batched-tokens", "512", "--weights-dtype", "checkpoint"]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    cfg = dataclasses.replace(tiny_configs()["mix"], n_routed_experts=8)
    path = tmp_path_factory.mktemp("serve") / "published"
    write_published_checkpoint(cfg, random_tensors(cfg, seed=7), path, max_shard_bytes=200_000)
    write_tokenizer(path, cfg.vocab_size, seed=7)
    tp1, tp2 = start_servers(["--model", str(path), *COMMON], ["--model", str(path), *COMMON, "--tp", "2"])
    yield tp1, tp2
    assert tp1.stop() == 0, tp1.log()[-3000:]
    assert tp2.stop() == 0, tp2.log()[-3000:]


def test_chat_on_quantised_weights_and_tp2_matches_tp1(servers):
    tp1, tp2 = servers
    assert "weights checkpoint" in tp1.log() and "weights checkpoint" in tp2.log()
    msgs = [{"role": "user", "content": "what does a cache hold?"}]
    answers = []
    for server in servers:
        client = OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        out = client.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0,
                                             logprobs=True, extra_body={"ignore_eos": True})
        assert out.choices[0].message.role == "assistant" and out.usage.completion_tokens == 12
        answers.append([t.token for t in out.choices[0].logprobs.content])
    assert answers[0] == answers[1]
