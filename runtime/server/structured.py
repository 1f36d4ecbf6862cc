"""Structured output: `response_format` json_object / json_schema, and `tool_choice` required / a named
function, enforced by grammar-constrained sampling.

xgrammar (picked over llguidance by measurement: mask fill for 64 rows of the tiny vocabulary 0.6 ms vs
1.4 ms with llguidance's parallel executor; docs/serving.md) compiles the request's grammar once, then each
choice gets its own matcher (`GrammarRow`, a `sampling.TokenConstraint`) that fills its row of the step's token
bitmask. In thinking mode the grammar lets the reasoning run free up to `</think>` and constrains what follows.
A schema xgrammar cannot compile is a 400 naming the field. tool_choice required / named: the output is a DSML
tool_calls block (dsml.py's layout) invoking one of the allowed functions with its declared parameter names
(values are free text up to 64 characters; the tool parser turns them into JSON arguments).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from dsv4.runtime.chat.dsml import CALLS_CLOSE, CALLS_OPEN, INVOKE_CLOSE, INVOKE_OPEN, PARAMETER_CLOSE, PARAMETER_OPEN
from dsv4.runtime.chat.special_tokens import THINK_END
from dsv4.runtime.server.errors import APIError

SCHEMA_FIELD = "response_format.json_schema.schema"
MAX_PARALLEL_CALLS = 4  # a required / named tool_choice grammar allows this many calls (parallel_tool_calls)
VALUE_CHARS = 64  # longest parameter value the tool_choice grammar allows


def _lit(text: str) -> str:
    """An EBNF string literal (JSON's escapes are xgrammar's)."""
    return json.dumps(text, ensure_ascii=False)


def tool_calls_ebnf(tools: Sequence[dict[str, Any]], parallel: bool) -> str:
    """EBNF of a DSML tool_calls block calling the given functions ({"name", "parameters"} each)."""
    nl = _lit("\n")
    param_head, type_head, value_head = _lit(PARAMETER_OPEN + ' name="'), _lit('" string="'), _lit('">')
    rules = [f"value ::= [^<]{{0,{VALUE_CHARS}}}"]
    invokes = []
    for i, fn in enumerate(tools):
        props = (fn.get("parameters") or {}).get("properties")
        names = [n for n in props if n] if isinstance(props, dict) else []
        pname = " | ".join(_lit(n) for n in names) if names else "[A-Za-z0-9_]{1,32}"
        head = _lit(INVOKE_OPEN + ' name="' + fn["name"] + '">\n')
        rules.append(f'param_{i} ::= {param_head} ({pname}) {type_head} ("true" | "false") {value_head} value '
                     f"{_lit(PARAMETER_CLOSE)}")
        rules.append(f"invoke_{i} ::= {head} (param_{i} ({nl} param_{i}){{0,15}})? {nl} {_lit(INVOKE_CLOSE)}")
        invokes.append(f"invoke_{i}")
    more = f"({nl} invoke){{0,{MAX_PARALLEL_CALLS - 1}}}" if parallel else ""
    root = f"root ::= {_lit(CALLS_OPEN + chr(10))} invoke {more} {_lit(chr(10) + CALLS_CLOSE)}"
    return "\n".join([root, f"invoke ::= {' | '.join(invokes)}", *rules])


def _bounded_strings_as_patterns(schema: Any) -> Any:
    """The schema with each length-bounded string (minLength / maxLength, no pattern or format) expressed as a
    pattern of JSON-safe characters: xgrammar 0.2.8's grammar for such strings admits control characters,
    quotes and backslashes unescaped, i.e. invalid JSON."""
    if isinstance(schema, list):
        return [_bounded_strings_as_patterns(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _bounded_strings_as_patterns(v) for k, v in schema.items()}
    lo, hi = out.get("minLength"), out.get("maxLength")
    bounds_ok = all(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0) for v in (lo, hi))
    if (out.get("type") == "string" and (lo is not None or hi is not None) and bounds_ok
            and "pattern" not in out and "format" not in out):
        out.pop("minLength", None)
        out.pop("maxLength", None)
        out["pattern"] = f'^[^\\x00-\\x1f"\\\\]{{{lo or 0},{"" if hi is None else hi}}}$'
    return out


def _compile_error(e: Exception) -> str:
    return re.sub(r"^\[[^\]]*\] \S+: ", "", str(e).strip())


@dataclass
class GrammarRow:
    matcher: Any  # xgrammar.GrammarMatcher

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        if self.matcher.is_terminated():  # the output is complete (and the stop token taken): ignore_eos goes on
            bitmask[row].fill_(-1)
        else:
            self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> None:
        if not self.matcher.is_terminated():
            self.matcher.accept_token(token_id)


@dataclass(frozen=True)
class GrammarSpec:
    """A compiled grammar; each choice that samples under it gets its own matcher."""

    compiled: Any  # xgrammar.CompiledGrammar

    def start(self) -> GrammarRow:
        import xgrammar as xgr

        return GrammarRow(xgr.GrammarMatcher(self.compiled))


class GrammarCompiler:
    """One per served tokenizer: xgrammar's view of the vocabulary (built once, ~0.1 s) and its compiler."""

    def __init__(self, tok: Any, vocab_size: int):
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast(tokenizer_object=tok.tok)
        info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size, stop_token_ids=tok.stop_token_ids)
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)

    def compile(self, response_format: dict[str, Any], thinking: bool) -> GrammarSpec | None:
        """The grammar of a request's response_format (None for text); thinking: the output starts with free
        reasoning closed by </think>."""
        import xgrammar as xgr

        kind = response_format.get("type")
        if kind == "json_object":
            grammar = xgr.Grammar.builtin_json_grammar()
        elif kind == "json_schema":
            schema = _bounded_strings_as_patterns(response_format["json_schema"]["schema"])
            try:
                grammar = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)
            except (RuntimeError, ValueError, TypeError) as e:
                raise APIError(400, f"{SCHEMA_FIELD}: cannot compile this JSON schema into a grammar: "
                               f"{_compile_error(e)}", param=SCHEMA_FIELD) from None
        else:
            return None
        return self._finish(grammar, thinking)

    def compile_tool_choice(self, tools: Sequence[dict[str, Any]], parallel: bool, thinking: bool) -> GrammarSpec:
        """The grammar of tool_choice required (all `tools`) or a named function (`tools` = that one)."""
        import xgrammar as xgr

        try:
            grammar = xgr.Grammar.from_ebnf(tool_calls_ebnf(tools, parallel))
        except RuntimeError as e:
            raise APIError(400, f"tool_choice: cannot build a grammar for these tools: {_compile_error(e)}",
                           param="tool_choice") from None
        return self._finish(grammar, thinking)

    def _finish(self, grammar: Any, thinking: bool) -> GrammarSpec:
        import xgrammar as xgr

        if thinking:
            reasoning = xgr.Grammar.from_ebnf(f"root ::= [^<]* {_lit(THINK_END)}")
            grammar = xgr.Grammar.concat(reasoning, grammar)
        return GrammarSpec(self.compiler.compile_grammar(grammar))
