"""Tokenizer: `tokenizer.json` through the `tokenizers` library, and the chat format a checkpoint uses.

Chat format, first match wins:
1. an explicit template (`chat_template=` / `with_chat_template`, the server's `--chat-template FILE`);
2. DeepSeek-V4's own encoding (`dsv4.runtime.chat.encoding`) when config.json says the checkpoint is a V4 model
   (`model_type: deepseek_v4` or a `DeepseekV4*` architecture): V4 ships no jinja template;
3. a bundled `chat_template.jinja`, then `tokenizer_config.json`'s `chat_template` (jinja2, sandboxed);
4. DeepSeek-V4's encoding.

`build_tokenizer(vocab_size)` trains a small deterministic byte-level BPE with V4's special tokens (used by
`dsv4 model init-random`); `Tokenizer.from_dir(path)` loads any Hugging Face style tokenizer folder.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsv4.runtime.chat.encoding import encode_messages
from dsv4.runtime.chat.options import chat_options
from dsv4.runtime.chat.special_tokens import BOS, CONTROL_TOKENS, EOS, PAD, TEXT_TOKENS

# Specials first, so BOS = id 0 and EOS = id 1.
SPECIAL_TOKENS = list(CONTROL_TOKENS) + list(TEXT_TOKENS)
__all__ = ["BOS", "EOS", "PAD", "SPECIAL_TOKENS", "Tokenizer", "build_tokenizer", "is_deepseek_v4_config",
           "load_chat_template", "write_tokenizer"]

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
    return _as_text_tokens(tok, TEXT_TOKENS)


def _as_text_tokens(tok: Any, contents: Sequence[str]) -> Any:
    """The tokenizer with these added tokens marked non-special: decoding with special tokens skipped keeps
    them (the reasoning / tool-call parsers read `</think>` and `｜DSML｜` from the text)."""
    from tokenizers import Tokenizer as HFTokenizer

    data = json.loads(tok.to_str())
    for entry in data["added_tokens"]:
        if entry["content"] in contents:
            entry["special"] = False
    return HFTokenizer.from_str(json.dumps(data, ensure_ascii=False))


def tokenizer_config() -> dict[str, Any]:
    """Like DeepSeek-V4's published tokenizer_config.json: no chat template (the model's encoding is code)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "add_bos_token": False, "add_eos_token": False,
        "model_max_length": 1048576,
    }


def write_tokenizer(out_dir: str | Path, vocab_size: int, seed: int = 0) -> None:
    out = Path(out_dir)
    tok = build_tokenizer(vocab_size, seed)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n")


def is_deepseek_v4_config(config: Mapping[str, Any]) -> bool:
    """Whether a checkpoint's config.json describes a DeepSeek-V4 model (which uses V4's chat encoding)."""
    if config.get("model_type") == "deepseek_v4":
        return True
    return any(str(a).startswith("DeepseekV4") for a in config.get("architectures") or [])


def load_chat_template(source: str | Path) -> str:
    """A jinja chat template from a file, or the template text itself when `source` is not a file but looks
    like a template (as vLLM's --chat-template takes either). ValueError otherwise."""
    path = Path(source)
    try:
        if path.is_file():
            return path.read_text()
    except OSError:
        pass
    text = str(source)
    if "{{" in text or "{%" in text:
        return text
    raise ValueError(f"chat template {text!r}: no such file")


def _bundled_template(p: Path, cfg: Mapping[str, Any]) -> str | None:
    jinja_file = p / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
    return template or None


def _render(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool, **extra: Any) -> str:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined)

    def raise_exception(msg: str) -> None:
        raise ValueError(f"chat template: {msg}")

    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **extra)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template: {e}") from None


@dataclass
class Tokenizer:
    """A loaded tokenizer: `encode`, `decode`, `apply_chat_template`, special token ids.
    chat_template None = DeepSeek-V4's encoding; otherwise a jinja template."""

    tok: Any
    chat_template: str | None = None
    bos_token: str = BOS
    eos_token: str = EOS
    extra_eos: list[int] = field(default_factory=list)

    @classmethod
    def from_dir(cls, path: str | Path, chat_template: str | None = None) -> Tokenizer:
        """chat_template: jinja text that overrides the checkpoint's chat format (see `load_chat_template`)."""
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
        model_cfg: dict[str, Any] = {}
        if (p / "config.json").is_file():
            model_cfg = json.loads((p / "config.json").read_text())
        if chat_template is None and not is_deepseek_v4_config(model_cfg):
            chat_template = _bundled_template(p, cfg)

        def token_str(v: Any, default: str) -> str:
            if isinstance(v, dict):
                return v.get("content", default)
            return v or default

        return cls(tok, chat_template, token_str(cfg.get("bos_token"), BOS), token_str(cfg.get("eos_token"), EOS))

    def with_chat_template(self, chat_template: str | None) -> Tokenizer:
        """This tokenizer with another chat format (None = DeepSeek-V4's encoding)."""
        return dataclasses.replace(self, chat_template=chat_template)

    @property
    def uses_v4_encoding(self) -> bool:
        return self.chat_template is None

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

    def thinking(self, chat_template_kwargs: Mapping[str, Any] | None = None,
                 reasoning_effort: str | None = None) -> bool:
        """Whether a request's prompt opens the reasoning (so its output starts with reasoning_content).
        Jinja templates: only when the request asks for it explicitly with `thinking` / `enable_thinking`."""
        if self.uses_v4_encoding:
            return chat_options(chat_template_kwargs, reasoning_effort).thinking
        kwargs = chat_template_kwargs or {}
        return bool(kwargs.get("thinking")) or bool(kwargs.get("enable_thinking"))

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, *,
                            tools: Sequence[Mapping[str, Any]] | None = None,
                            chat_template_kwargs: Mapping[str, Any] | None = None,
                            reasoning_effort: str | None = None, response_format: Any = None) -> str:
        """The prompt text. V4 encoding: options mapped as vLLM maps them (`dsv4.runtime.chat.options`); a
        jinja template gets messages, tools, reasoning_effort, bos/eos tokens and the chat_template_kwargs.
        ValueError for messages the format cannot express."""
        if self.uses_v4_encoding:
            return encode_messages(messages, chat_options(chat_template_kwargs, reasoning_effort), tools=tools,
                                   response_format=response_format, add_generation_prompt=add_generation_prompt)
        reserved = ("messages", "add_generation_prompt")
        extra = {k: v for k, v in (chat_template_kwargs or {}).items() if k not in reserved}
        extra.update(bos_token=self.bos_token, eos_token=self.eos_token, tools=list(tools) if tools else None,
                     reasoning_effort=reasoning_effort)
        return _render(self.chat_template, [dict(m) for m in messages], add_generation_prompt, **extra)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    **chat: Any) -> list[int]:
        """Token ids of `apply_chat_template(messages, add_generation_prompt, **chat)`."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **chat))


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
