"""TEST ONLY: make the model write a given text, so tests drive the output parsers with real DSML through the
real server and client. Off unless the server starts with DSV4_TEST_FORCED_OUTPUT=1 (never set it in
production: any client could then dictate the output). A chat request with the header
`X-DSV4-Test-Forced-Output: <the text as a JSON string>` then samples exactly the text's tokens, then EOS;
the forcing is a token constraint (sampling.TokenConstraint), the same seam grammar-constrained decoding uses.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from dsv4.runtime.server.errors import APIError

ENV = "DSV4_TEST_FORCED_OUTPUT"
HEADER = "x-dsv4-test-forced-output"


def enabled_from_env() -> bool:
    return os.environ.get(ENV, "") == "1"


def set_bit(bitmask_row: torch.Tensor, token_id: int) -> None:
    word, bit = divmod(token_id, 32)
    value = 1 << bit
    bitmask_row[word] |= value - (1 << 32) if value >= 1 << 31 else value  # int32: bit 31 is the sign


@dataclass
class ForcedRow:
    ids: list[int]
    end_ids: list[int]
    pos: int = 0

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row].zero_()
        for t in [self.ids[self.pos]] if self.pos < len(self.ids) else self.end_ids:
            set_bit(bitmask[row], t)

    def accept(self, token_id: int) -> None:
        self.pos += 1


@dataclass(frozen=True)
class ForcedTokens:
    """Every choice writes `ids`, then one of `end_ids`."""

    ids: list[int]
    end_ids: list[int] = field(default_factory=list)

    def start(self) -> ForcedRow:
        return ForcedRow(self.ids, self.end_ids)


def forced_tokens(header: str, tok: object) -> ForcedTokens:
    try:
        text = json.loads(header)
    except ValueError:
        text = None
    if not isinstance(text, str):
        raise APIError(400, f"{HEADER} must be a JSON string", param=HEADER)
    return ForcedTokens(tok.encode(text), tok.stop_token_ids)  # type: ignore[attr-defined]
