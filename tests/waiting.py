"""Waiting on conditions, never on fixed sleeps: one helper for threads and one for coroutines.

A busy 2-core machine may be ten times slower than a quiet one, so tests poll for the state they
need with a generous outer timeout instead of sleeping for a guess.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float = 30.0, interval: float = 0.05, what: str = "") -> T:
    """Poll `condition` until it returns something truthy, and return that; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or condition}; last value {result!r}")
        time.sleep(interval)


async def wait_until_async(condition: Callable[[], T | Awaitable[T]], timeout: float = 30.0, interval: float = 0.005,
                           what: str = "") -> T:
    """`wait_until` for a coroutine: `condition` may be sync or async; the event loop runs while it waits."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or condition}; last value {result!r}")
        await asyncio.sleep(interval)
