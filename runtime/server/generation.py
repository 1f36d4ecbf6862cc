"""Running requests on the engine for one HTTP request: admit its prompts, interleave their output streams,
or collect them to completion (cancelling them if the client goes away)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from dsv4.runtime.engine.request import RequestOutput, SamplingParams, TokenLogprob
from dsv4.runtime.server.errors import ENGINE_ERRORS, APIError, from_engine_error
from dsv4.runtime.server.state import ServerState
from fastapi import Request


def admit(state: ServerState, prompts: list[list[int]], params: SamplingParams, rid: str, priority: int,
          ) -> list[Any]:
    """Admit every prompt (or none) and queue them; an engine refusal becomes its HTTP error."""
    try:
        return state.engine.generate_many(prompts, params, rid, priority)
    except ENGINE_ERRORS as e:
        raise from_engine_error(e) from None


async def merge(gens: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several request streams as (prompt index, output); cancelling closes all of them."""
    if len(gens) == 1:
        try:
            async for out in gens[0]:
                yield 0, out
        finally:
            await gens[0].aclose()  # type: ignore[attr-defined]
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, g: Any) -> None:
        try:
            async for out in g:
                await q.put((i, out))
        except Exception as e:  # surfaced to the consumer
            await q.put((i, e))
        finally:
            await q.put((i, None))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(gens)
        while remaining:
            i, out = await q.get()
            if out is None:
                remaining -= 1
            elif isinstance(out, Exception):
                raise out
            else:
                yield i, out
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for g in gens:  # a cancelled pump does not close its stream: abort what did not finish
            await g.aclose()  # type: ignore[attr-defined]


@dataclass
class Choice:
    """One choice's whole output, accumulated from its deltas."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


async def collect(request: Request, gens: list[AsyncIterator[RequestOutput]], n: int,
                  ) -> tuple[dict[int, RequestOutput], dict[tuple[int, int], Choice]]:
    """Run requests to completion; cancel them if the client disconnects first."""
    finals: dict[int, RequestOutput] = {}
    choices: dict[tuple[int, int], Choice] = {(i, j): Choice() for i in range(len(gens)) for j in range(n)}

    async def consume() -> None:
        async for pi, out in merge(gens):
            if out.error:
                raise APIError(500, out.error, "internal_error")
            for d in out.deltas:
                c = choices[(pi, d.index)]
                c.text += d.text
                c.token_ids += d.token_ids
                c.logprobs += d.logprobs
                if d.finish_reason is not None:
                    c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
            if out.finished:
                finals[pi] = out

    task = asyncio.create_task(consume())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                task.result()
                break
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise APIError(499, "client disconnected", "client_closed_request")
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for g in gens:  # idempotent; aborts streams whose consumer never started
            await g.aclose()  # type: ignore[attr-defined]
    return finals, choices
