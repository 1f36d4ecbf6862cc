"""Tokenizer: `tokenizer.json` through the `tokenizers` library, chat template from `tokenizer_config.json`
(jinja2), with DeepSeek's chat format as the fallback when no template ships.

`build_tokenizer(vocab_size)` trains a small deterministic byte-level BPE (used by `dsv4 model init-random`);
`Tokenizer.from_dir(path)` loads any Hugging Face style tokenizer folder.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK, END_THINK = "<think>", "</think>"
SPECIAL_TOKENS = [
    BOS, EOS, PAD, USER, ASSISTANT, THINK, END_THINK,
    "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
    "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>",
]

# DeepSeek chat format (non-thinking mode): BOS, system text, then alternating user / assistant turns.
DEEPSEEK_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for m in messages if m['role'] == 'system' %}{{ m['content'] }}{% endfor -%}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'user' %}" + USER + "{{ m['content'] }}"
    "{%- elif m['role'] == 'assistant' %}" + ASSISTANT + END_THINK + "{{ m['content'] }}" + EOS + ""
    "{%- elif m['role'] == 'tool' %}<｜tool▁output▁begin｜>{{ m['content'] }}<｜tool▁output▁end｜>"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}" + ASSISTANT + END_THINK + "{% endif %}"
)

_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by word "
    "but not what all were we when your can said there use an each which she do how their if will up other about "
    "out many then them these so some her would make like him into time has look two more write go see number no "
    "way could people my than first water been call who oil its now find long down day did get come made may part "
    "model token cache layer attention window sparse compressed expert router kernel tensor block request server "
    "hello world please answer question code python function return value list dict class import def print "
    "deepseek kubernetes operator endpoint latency throughput memory budget prefix decode prefill batch"
).split()


def _corpus(seed: int, n_lines: int = 3000) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        n = rng.randint(3, 14)
        words = [rng.choice(_WORDS) for _ in range(n)]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 99999)))
        s = " ".join(words)
        s = s[0].upper() + s[1:] + rng.choice([".", "?", "!", ",", ":", ";", " ()", " = []", "\n"])
        lines.append(s)
    return lines


def build_tokenizer(vocab_size: int, seed: int = 0) -> Any:
    """Train a byte-level BPE `tokenizers.Tokenizer` with exactly `vocab_size` entries (specials first:
    BOS = id 0, EOS = id 1). Deterministic for a given (vocab_size, seed)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    base = 256 + len(SPECIAL_TOKENS)
    if vocab_size < base:
        raise ValueError(f"vocab_size must be >= {base} for a byte-level BPE with {len(SPECIAL_TOKENS)} specials, "
                         f"got {vocab_size}")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False, min_frequency=1,
    )
    lines = _corpus(seed)
    tok.train_from_iterator(lines, trainer=trainer)
    # Small corpora can run out of merges before vocab_size: pad with unused reserved tokens.
    missing = vocab_size - tok.get_vocab_size()
    if missing > 0:
        tok.add_special_tokens([f"<｜reserved_{i}｜>" for i in range(missing)])
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"trained tokenizer has {tok.get_vocab_size()} entries, expected {vocab_size}")
    return tok


def tokenizer_config(chat_template: str = DEEPSEEK_CHAT_TEMPLATE) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "add_bos_token": False, "add_eos_token": False,
        "model_max_length": 1048576,
        "chat_template": chat_template,
    }


def write_tokenizer(out_dir: str | Path, vocab_size: int, seed: int = 0) -> None:
    out = Path(out_dir)
    tok = build_tokenizer(vocab_size, seed)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n")


def _render(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool, **extra: Any) -> str:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined)

    def raise_exception(msg: str) -> None:
        raise ValueError(f"chat template: {msg}")

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **extra)


@dataclass
class Tokenizer:
    """A loaded tokenizer: `encode`, `decode`, `apply_chat_template`, special token ids."""

    tok: Any
    chat_template: str = DEEPSEEK_CHAT_TEMPLATE
    bos_token: str = BOS
    eos_token: str = EOS
    extra_eos: list[int] = field(default_factory=list)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        p = Path(path)
        tj = p / "tokenizer.json"
        if not tj.exists():
            raise FileNotFoundError(f"{tj}: no tokenizer.json")
        tok = HFTokenizer.from_file(str(tj))
        cfg: dict[str, Any] = {}
        tc = p / "tokenizer_config.json"
        if tc.exists():
            cfg = json.loads(tc.read_text())
        template = cfg.get("chat_template") or DEEPSEEK_CHAT_TEMPLATE
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])

        def token_str(v: Any, default: str) -> str:
            if isinstance(v, dict):
                return v.get("content", default)
            return v or default

        return cls(tok, template, token_str(cfg.get("bos_token"), BOS), token_str(cfg.get("eos_token"), EOS))

    @property
    def vocab_size(self) -> int:
        return int(self.tok.get_vocab_size())

    @property
    def bos_token_id(self) -> int | None:
        return self.tok.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.tok.token_to_id(self.eos_token)

    @property
    def stop_token_ids(self) -> list[int]:
        ids = [self.eos_token_id] + list(self.extra_eos)
        return [i for i in ids if i is not None]

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return list(ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        return _render(self.chat_template, messages, add_generation_prompt,
                       bos_token=self.bos_token, eos_token=self.eos_token, **extra)

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))


class IncrementalDecoder:
    """Streaming detokenisation: `push(token_id)` returns the newly completed text (holds back partial
    UTF-8 sequences, which decode to U+FFFD, until they complete)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.t = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already returned

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.t.decode(self.ids, skip_special_tokens=self.skip)
        if text.endswith("\ufffd"):
            return ""
        new = text[self.emitted:]
        self.emitted = len(text)
        return new
