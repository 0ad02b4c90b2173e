"""Atomic writes of small text and JSON files, local or gs://.

A reader, a resumed run or a crash sees a file's old content or its new content, never half of it:
locally through a temporary file beside the target, flushed to disk and renamed over it; on gs:// an
object upload is already all-or-nothing, so the object is written directly.
"""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
    """A gs:// path: read and written through epath, never through local-file APIs."""
    return str(path).startswith("gs://")


def write_text(target: str | os.PathLike, text: str) -> None:
    """Replaces `target` with `text` atomically, creating its folder."""
    target = epath.Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(target):
        target.write_text(text)
        return
    tmp = target.parent / f".{target.name}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)  # overwrites, unlike a plain rename on some platforms


def write_json(target: str | os.PathLike, obj: Any, *, sort_keys: bool = False) -> None:
    """Replaces `target` with `obj` as indented JSON, atomically."""
    write_text(target, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")
