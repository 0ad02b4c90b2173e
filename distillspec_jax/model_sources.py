"""The cache of converted checkpoints (`<workdir>/models/<name>`): reused only while its source is the same.

A conversion records what it was made from in `distillspec_source.json`, and a later run reuses it only
when the source still matches:
    hub id        the revision the loader would use: the snapshot folder of the local HF cache (its
                  commit hash), else the Hub's current commit
    local folder  a fingerprint of config.json, the safetensors index and every safetensors file's
                  header, size and mtime (replacing or rewriting a checkpoint in place changes it,
                  without reading gigabytes of weights)
Otherwise the folder is converted again, and the log says why. A conversion without the record (made by
an older version, or cut short) is redone too; the record is written last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import struct
from typing import Any

import jax

from distillspec_jax import files, hostmem, hub
from distillspec_jax import sharding as shd
from distillspec_jax.models import convert

SOURCE_FILE = "distillspec_source.json"
SOURCE_SCHEMA = 1
MAX_HEADER_BYTES = 100 * 1024**2  # a safetensors header is a few MB at most; more means a damaged file


def _safetensors_header(path: pathlib.Path) -> bytes:
    """The JSON header of a safetensors file (names, dtypes, shapes and offsets of every tensor)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return head
        (n,) = struct.unpack("<Q", head)
        return head + f.read(min(n, MAX_HEADER_BYTES))


def local_identity(folder: str | os.PathLike) -> dict[str, Any]:
    """Fingerprint of a local HF checkpoint folder; `files` lists what went into it, for the log."""
    root = pathlib.Path(folder).expanduser().resolve()
    digest = hashlib.sha256()
    listed = {}
    for name in (convert.CONFIG_FILE, convert.INDEX_FILE):
        if (root / name).is_file():
            digest.update(name.encode() + b"\0" + (root / name).read_bytes())
            listed[name] = (root / name).stat().st_size
    for path in sorted(root.glob("*.safetensors")):
        stat = path.stat()
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode() + _safetensors_header(path))
        listed[path.name] = stat.st_size
    return {"kind": "local", "path": str(root), "fingerprint": digest.hexdigest(), "files": listed}


def hub_identity(repo_id: str, cache_dir: str | None = None) -> dict[str, Any]:
    """The revision a conversion of `repo_id` would use (revision None when it cannot be known offline)."""
    import huggingface_hub

    cached = huggingface_hub.try_to_load_from_cache(repo_id, convert.CONFIG_FILE, cache_dir=cache_dir)
    if isinstance(cached, str):  # .../models--org--name/snapshots/<commit>/config.json
        return {"kind": "hub", "repo": repo_id, "revision": pathlib.Path(cached).parent.name, "where": "local HF cache"}
    revision = None
    if not hub.hub_offline() and hub.probe_hub() is None:
        try:
            revision = huggingface_hub.HfApi().model_info(repo_id).sha
        except Exception as err:  # noqa: BLE001 - any Hub failure leaves the revision unknown
            logging.warning("could not ask the Hub for the revision of %s: %s", repo_id, err)
    return {"kind": "hub", "repo": repo_id, "revision": revision, "where": "Hub"}


def source_identity(source: str) -> dict[str, Any]:
    return local_identity(source) if os.path.isdir(os.path.expanduser(source)) else hub_identity(source)


def _why_stale(recorded: dict[str, Any] | None, current: dict[str, Any], param_dtype: str) -> str | None:
    """Why a converted folder cannot be reused (None: it can)."""
    if recorded is None:
        return f"it has no {SOURCE_FILE} (converted by an older version, or the conversion was cut short)"
    if recorded.get("param_dtype") != param_dtype:
        return f"it was converted to {recorded.get('param_dtype')}, not {param_dtype}"
    was = recorded.get("identity") or {}
    if was.get("kind") != current["kind"]:
        return f"its source was a {was.get('kind')} checkpoint, now a {current['kind']} one"
    if current["kind"] == "hub":
        if current["revision"] is None:
            logging.warning("cannot tell the revision of %s (offline and not in the local HF cache); using the "
                            "conversion of revision %s", current["repo"], was.get("revision"))
            return None
        if was.get("revision") != current["revision"]:
            return (f"it was converted from revision {was.get('revision')}, the {current['where']} has "
                    f"{current['revision']}")
        return None
    if was.get("fingerprint") != current["fingerprint"]:
        before, now = was.get("files") or {}, current["files"]
        changed = sorted(n for n in set(before) | set(now) if before.get(n) != now.get(n))
        detail = (f"files changed: {', '.join(changed)}" if changed
                  else "a file was rewritten (same sizes, new mtime or header)")
        return f"the checkpoint in {current['path']} changed since it was converted ({detail})"
    return None


def converted(source: str, param_dtype: str, out, mesh) -> str:
    """The Orbax folder `out` of HF checkpoint `source`, converted unless a conversion of the same source
    (and dtype) is there. Every process calls it; process 0's judgement decides for all of them."""
    from etils import epath

    out = epath.Path(out)
    current = source_identity(source)
    record = out / SOURCE_FILE
    recorded = json.loads(record.read_text()) if record.exists() else None
    why = _why_stale(recorded, current, param_dtype) if (out / convert.ORBAX_CONFIG).exists() else "first use"
    if shd.from_process_0(why is None):
        logging.info("using the converted %s in %s", source, out)
        return str(out)
    if why != "first use":
        print(f"[prepare] converting {source} again: {why}", flush=True)
    print(f"[prepare] converting {source} to Orbax in {out}", flush=True)
    if out.exists():
        if jax.process_index() == 0:
            out.rmtree()  # no stale tokenizer files or record survive into the new conversion
        shd.barrier(f"distillspec:reconvert:{out.name}")
    # The loader resolves hub ids itself: the local HF cache first, then the Hub (with one early probe).
    convert.convert_hf_to_orbax(source, str(out), dtype=param_dtype, mesh=mesh)
    hostmem.release_freed()  # the conversion's freed tensors: gigabytes the allocator would otherwise keep
    if current["kind"] == "hub":
        current = hub_identity(source)  # the revision just converted, now in the local HF cache
    if jax.process_index() == 0:
        files.write_json(record, {"schema": SOURCE_SCHEMA, "source": source, "param_dtype": param_dtype,
                                  "identity": current})
    return str(out)
