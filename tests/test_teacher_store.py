"""Stored teacher outputs: ArrayRecord shards written by 2 hosts and read back identically, each host reading its
own; resume at a data position; missing, truncated and partial shards; outputs that do not match the run; and a
`:test` run from stored logits that never loads the target."""

from __future__ import annotations

import json

import numpy as np
import pytest
from etils import epath

from distillspec_jax.data import teacher_store
from distillspec_jax.data.source import DataContext
from distillspec_jax.sampling import MASK_VALUE

K, LENGTH, PAD = 4, 24, 0


def _records(seed: int, examples: list[int]) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for j in examples:
        prompt_len, r = int(rng.integers(2, 8)), int(rng.integers(1, 12))
        logprobs = np.sort(np.log(rng.dirichlet(np.ones(K + 1)))[:K])[::-1].astype(np.float32)
        out.append({"example": j, "tokens": rng.integers(1, 50, prompt_len + r).astype(np.int32),
                    "prompt_len": prompt_len, "ids": rng.integers(0, 50, (r, K)).astype(np.int32),
                    "logprobs": np.broadcast_to(logprobs, (r, K)).copy(),
                    "tail": np.full(r, np.log(1 - np.exp(logprobs).sum()), np.float32)})
    return out


def _meta(hosts: int = 2) -> teacher_store.StoreMeta:
    return teacher_store.StoreMeta(k=K, real_vocab_size=50, tokenizer="abc", temperature=1.0, hosts=hosts,
                                   length=LENGTH)


def _write(directory, hosts: int = 2, per_host: int = 6) -> dict[int, list[dict]]:
    written = {h: _records(h, list(range(h, hosts * per_host, hosts))) for h in range(hosts)}
    for h, records in written.items():
        teacher_store.write_shard(directory, h, hosts, records)
    teacher_store.write_meta(directory, _meta(hosts))
    return written


def _batches(directory, host: int, position: int, n: int, *, hosts: int = 2, global_batch: int = 4):
    source = teacher_store.make_source(directory, global_batch, seed=3, pad_id=PAD, host=host, hosts=hosts)
    stream = source(position, DataContext(rng=None, draft=None, mesh=None))
    return [next(stream) for _ in range(n)]


def test_two_hosts_write_and_read_back_their_own_records_identically(tmp_path):
    directory = epath.Path(tmp_path)
    written = _write(directory)
    for host in (0, 1):
        by_tokens = {tuple(r["tokens"]): r for r in written[host]}
        seen = []
        for batch in _batches(directory, host, 0, 3):  # 6 records, 2 rows per host: one epoch
            assert batch["tokens"].shape == (2, LENGTH) and batch["teacher_ids"].shape == (2, LENGTH, K)
            for b in range(2):
                length = int(np.flatnonzero(batch["tokens"][b] != PAD).max()) + 1
                rec = by_tokens[tuple(batch["tokens"][b, :length])]  # only this host's records appear
                start, end = rec["prompt_len"], len(rec["tokens"])
                rows = slice(start - 1, end - 1)
                np.testing.assert_array_equal(batch["teacher_ids"][b, rows], rec["ids"])
                np.testing.assert_array_equal(batch["teacher_logprobs"][b, rows], rec["logprobs"])
                np.testing.assert_array_equal(batch["teacher_tail"][b, rows], rec["tail"])
                expected_mask = np.zeros(LENGTH, np.float32)
                expected_mask[rows] = 1.0
                np.testing.assert_array_equal(batch["loss_mask"][b], expected_mask)
                # Uncounted positions hold a valid distribution (all mass on the first bucket), never NaN.
                assert np.all(batch["teacher_logprobs"][b, end - 1 :, 0] == 0.0)
                assert np.all(batch["teacher_tail"][b, end - 1 :] == MASK_VALUE)
                seen.append(rec["example"])
        assert sorted(seen) == sorted(r["example"] for r in written[host])  # one epoch reads each record once


def test_a_resumed_source_continues_at_the_same_record(tmp_path):
    directory = epath.Path(tmp_path)
    _write(directory)
    straight = _batches(directory, 1, 0, 7)  # past the end of the first epoch (3 batches)
    for position in (2, 3, 5):
        resumed = _batches(directory, 1, position, 7 - position)
        for a, b in zip(straight[position:], resumed):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
    first, second = ([b["tokens"] for b in straight[i : i + 3]] for i in (0, 3))
    assert any(not np.array_equal(x, y) for x, y in zip(first, second))  # each epoch has its own order


def test_missing_truncated_and_partial_shards_are_named(tmp_path):
    directory = epath.Path(tmp_path / "missing")
    _write(directory)
    (directory / "shard-00001-of-00002.array_record").unlink()
    with pytest.raises(FileNotFoundError, match="shard-00001-of-00002.array_record is missing"):
        _batches(directory, 1, 0, 1)

    directory = epath.Path(tmp_path / "truncated")
    _write(directory)
    shard = directory / "shard-00000-of-00002.array_record"
    shard.write_bytes(shard.read_bytes()[: len(shard.read_bytes()) // 2])
    with pytest.raises(ValueError, match="shard-00000-of-00002.array_record .*(truncated|damaged)"):
        _batches(directory, 0, 0, 1)

    directory = epath.Path(tmp_path / "partial")
    written = _write(directory)
    bad = [dict(r) for r in written[0]]
    bad[2]["ids"] = bad[2]["ids"][:-1]  # one teacher row short of the response
    teacher_store.write_shard(directory, 0, 2, bad)
    with pytest.raises(ValueError, match=r"record 2 of stored teacher shard shard-00000-of-00002 \(data position \d+\) "
                                         "is partial"):
        _batches(directory, 0, 0, 3)


def test_outputs_that_do_not_belong_to_the_run_are_refused(tmp_path):
    directory = epath.Path(tmp_path)
    _write(directory)
    meta = teacher_store.read_meta(directory)
    ok = dict(k=K, real_vocab_size=50, tokenizer="abc", temperature=1.0, hosts=2)
    teacher_store.check_compatible(meta, directory, **ok)
    for field, value, message in [("k", 8, "k=4"), ("real_vocab_size", 64, "vocabulary of 50"),
                                  ("tokenizer", "xyz", "tokenizer abc"), ("temperature", 0.7, "temperature 1.0"),
                                  ("hosts", 1, "2 shards")]:
        with pytest.raises(ValueError, match=message):
            teacher_store.check_compatible(meta, directory, **{**ok, field: value})
    with pytest.raises(FileNotFoundError, match="rerun the data stage"):
        teacher_store.read_meta(epath.Path(tmp_path / "nothing"))
    sidecar = json.loads((directory / "shard-00000-of-00002.json").read_text())
    assert sidecar["records"] == 6 and sidecar["examples"] == [0, 2, 4, 6, 8, 10]


def test_a_run_from_stored_logits_never_loads_the_target(pipeline_workdir, tmp_path, monkeypatch):
    """`:test` with generator target_logits: the data stage stores the target's top-k, then a distill-only run
    trains from the shards alone; the target's folder is never restored in that run."""
    from configs import fkl
    from distillspec_jax import experiment
    from distillspec_jax.models import convert
    from distillspec_jax.stages import prepare

    c = fkl.get_config("test")
    c.generator.kind, c.generator.logits_k = "target_logits", 16
    c.tiny.cache_dir = str(pipeline_workdir / "models")
    c.plots = False
    workdir = tmp_path / "stored"
    c.stages = "data"
    experiment.run(c, str(workdir))
    store = workdir / "data" / teacher_store.STORE_DIR
    meta = json.loads((store / teacher_store.META_FILE).read_text())
    assert meta["k"] == 16 and meta["hosts"] == 1
    assert json.loads((store / "shard-00000-of-00001.json").read_text())["records"] == len(
        json.loads((workdir / "data" / "train.json").read_text())["prompts"])

    loaded = []
    real_load = convert.load_orbax
    monkeypatch.setattr(prepare.convert, "load_orbax", lambda d, *a, **kw: loaded.append(str(d)) or real_load(d, *a, **kw))
    c.stages = "distill"
    experiment.run(c, str(workdir))
    assert loaded and not any(d.rstrip("/").endswith("/target") for d in loaded), loaded
    summary = json.loads((workdir / "distilled" / "summary.json").read_text())
    assert summary["steps"] == c.distill.steps and np.isfinite(summary["last_metrics"]["loss"])
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["divergence"] < lines[0]["divergence"]  # it learns from the stored teacher
