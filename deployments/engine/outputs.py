"""Output processing helpers: a row's recorded log-probabilities as the API's entries, and several sequences'
chunk streams interleaved (a request with n > 1). Text stages (detokenizer, stop strings, reasoning) live in
`deployments.engine.textstream`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from deployments.common.types import Chunk, TokenLogprob
from deployments.engine.rows import Row


class LogprobReader:
    """Turns a row's recorded (logprob, top alternatives) into TokenLogprobs, a chunk's worth at a time."""

    def __init__(self, row: Row, tokenizer) -> None:
        self._row, self._tokenizer, self._read = row, tokenizer, 0

    def read(self, upto: int) -> list[TokenLogprob] | None:
        """The entries of tokens read..upto (None when the request did not ask for logprobs)."""
        if self._row.want_logprobs is None:
            return None
        entries = self._row.logprobs[self._read : upto]
        ids = self._row.tokens[self._read : upto]
        self._read = upto
        text = self._text
        return [TokenLogprob(text(i), lp, [(text(t), tlp) for t, tlp in top]) for i, (lp, top) in zip(ids, entries)]

    def _text(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id], skip_special_tokens=False)


async def merge_streams(streams: list[AsyncIterator[Chunk]]) -> AsyncIterator[Chunk]:
    """Interleave several chunk streams as their items arrive; the first error ends all of them."""
    items: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream: AsyncIterator[Chunk]) -> None:
        try:
            async for item in stream:
                items.put_nowait(item)
        except Exception as exc:
            items.put_nowait(exc)
        finally:
            items.put_nowait(done)

    tasks = [asyncio.create_task(pump(stream)) for stream in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await items.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
