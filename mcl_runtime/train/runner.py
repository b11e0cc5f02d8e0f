"""What collection and correction share: the run folder's settings file, and running one coroutine
per item with N in flight, appending each finished record to an append-only file."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

from mcl_runtime.agents.records import append_record, write_json

T = TypeVar("T")


def check_settings(path: Path, settings: dict, fixed: Sequence[str]) -> None:
    """Write ``settings`` to ``path``; a folder made earlier must agree on the ``fixed`` keys, else
    resuming would mix incompatible records."""
    if path.exists():
        earlier = json.loads(path.read_text(encoding="utf-8"))
        changed = [k for k in fixed if earlier.get(k) != settings.get(k)]
        if changed:
            raise ValueError(
                f"{path.parent} was made with other settings ({', '.join(changed)} differ: "
                f"{[earlier.get(k) for k in changed]} vs {[settings.get(k) for k in changed]}); "
                "use a new output folder"
            )
    write_json(path, settings)


async def run_all(
    items: Sequence[T],
    work: Callable[[T], Awaitable[dict]],
    store: Path,
    workers: int,
    progress: bool,
    desc: str,
    name: Callable[[T], str],
) -> list[str]:
    """``work(item)`` for every item, ``workers`` at a time; each record is appended to ``store``
    as soon as it is done. An item whose work raises is reported and left undone (its error is
    returned), so a later run retries it; ``BaseException`` (an interrupt) stops the run."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    slots = asyncio.Semaphore(workers)
    errors: list[str] = []

    async def guarded(item: T) -> dict | None:
        async with slots:
            try:
                return await work(item)
            except Exception as exc:  # this item stays undone; the others go on
                errors.append(f"{name(item)}: {type(exc).__name__}: {exc}")
                print(f"mcl_runtime.train: {errors[-1]} (left for a later run)", file=sys.stderr)
                return None

    with tqdm(total=len(items), disable=not progress, desc=desc) as bar:
        for next_done in asyncio.as_completed([guarded(item) for item in items]):
            record = await next_done
            if record is not None:
                append_record(store, record)
            bar.update(1)
    return errors
