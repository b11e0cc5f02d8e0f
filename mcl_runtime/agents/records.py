"""Record files: append-only JSONL that survives a kill mid-write (a torn last line is dropped on
reading), and atomic rewrites. The pipeline's results and the training collectors' stores use them."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def read_records(path: Path) -> list[dict]:
    """The records of an append-only JSONL file. A torn last line (no newline yet: a kill
    mid-write) is cut off the file; a bad complete line is corruption and raises ``ValueError``."""
    if not path.exists():
        return []
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    if cut < len(data):
        with open(path, "r+b") as f:
            f.truncate(cut)
    records = []
    for number, line in enumerate(data[:cut].splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as exc:
                raise ValueError(f"{path}: line {number} is not JSON ({exc}); the file is corrupt") from exc
    return records


def append_record(path: Path, record: dict) -> None:
    """Append one JSON line and make it durable before returning."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    """Replace ``path`` atomically with ``records``, one JSON line each."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    """Replace ``path`` atomically with ``obj`` as indented JSON."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
