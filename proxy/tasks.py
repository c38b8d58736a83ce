"""The one way clawgate starts a background task: named, owned, its failure never lost.

asyncio keeps only a weak reference to a task, so a task nobody holds can vanish mid-run;
and an exception nobody retrieves is reported at garbage collection, far from its cause.
:func:`spawn` puts the task in its owner's set until it is done and hands a failure to
``on_error`` (or just marks it retrieved, when the owner reports failures to its waiters).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["spawn"]

_T = TypeVar("_T")
OnError = Callable[[asyncio.Task[Any], BaseException], None]


def spawn(
    coro: Coroutine[Any, Any, _T],
    name: str,
    owner: set[asyncio.Task[Any]],
    *,
    loop: asyncio.AbstractEventLoop | None = None,
    on_error: OnError | None = None,
) -> asyncio.Task[_T]:
    """Create the task ``name`` on ``loop`` (default: the running loop), held by ``owner``."""
    task = (loop or asyncio.get_running_loop()).create_task(coro, name=name)
    owner.add(task)
    task.add_done_callback(lambda t: _done(t, owner, on_error))
    return task


def _done(task: asyncio.Task[Any], owner: set[asyncio.Task[Any]], on_error: OnError | None) -> None:
    owner.discard(task)
    if task.cancelled():
        return
    exc = task.exception()  # also marks it retrieved
    if exc is not None and on_error is not None:
        on_error(task, exc)
