"""The research presets end to end (design §9: the real path is the product).

`main.py` runs every stage on the real hub ids (Qwen/Qwen3-0.6B ... Qwen/Qwen3-32B, openai/gsm8k) with the
presets' own dtypes, remat and loss chunking; only sizes (steps, batches, lengths, prompts, γ) are shrunk.
The repos have the real file layout and vocabulary but tiny random weights (tests/fake_hub.py):

* offline: HF_HUB_OFFLINE=1 against a Hugging Face cache that huggingface_hub and datasets wrote themselves
  (`hf_cache`, conftest.py); the default config and every real preset, and every divergence file;
* online: an empty cache and HF_ENDPOINT at a local stand-in for the Hub, which the run downloads from.
"""

from __future__ import annotations

import fnmatch
import json
import math
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from configs import adaspec, blackbox, fkl, jsd, rkl, tvd
from configs.common import REAL_PAIRS, STAGES
from distillspec_jax import hub
from distillspec_jax.data import sources
from distillspec_jax.models import convert
from tests import fake_hub
from tests.conftest import REPO, run_main

DIVERGENCE_CONFIGS = {"jsd": jsd, "fkl": fkl, "rkl": rkl, "tvd": tvd, "adaspec": adaspec, "blackbox": blackbox}
QWEN3_NUM_TOKENS = 151669  # the tokenizer's tokens; the embedding has 151936 rows
GAMMAS = (1, 2)
# Sizes only: what is computed (models, dtypes, remat, loss chunk, divergence, generator) stays the preset's.
# warmup_steps is a step count too: it must not exceed distill.steps.
SIZES = ("--config.distill.steps=2", "--config.distill.warmup_steps=1", "--config.distill.batch_size=2",
         "--config.data.num_train_examples=4", "--config.data.max_prompt_len=64", "--config.data.max_response_len=16",
         "--config.data.pad_multiple=32", "--config.generator.max_new_tokens=8", "--config.eval.num_prompts=2",
         "--config.eval.batch_size=2", "--config.eval.max_new_tokens=8",
         f"--config.eval.gammas=({','.join(map(str, GAMMAS))})")
TIMED = ("--config.eval.timing_repeats=1",)  # the default run and the online one time their decoding too
UNTIMED = ("--config.eval.timing_repeats=0",)
# Every real preset once and every divergence file once: a preset changes only the hub ids, a divergence
# file only the loss, so the pairing covers both with five runs instead of 25. Ordered so that runs with
# the same shapes (tied draft and untied target; then both tied) follow each other and share compilations.
RUNS = [("jsd", ""), ("tvd", "0.6b-8b"), ("adaspec", "1.7b-32b"), ("blackbox", "0.6b-1.7b"), ("rkl", "0.6b-4b"),
        ("jsd", "0.6b-30b-a3b"), ("fkl", "1.7b-235b-a22b")]
# One run also draws the lossy frontier (one form, one ε) at the real vocabulary, with GSM8K's accuracy.
LOSSY_PRESET = "0.6b-4b"
LOSSY = ("--config.eval.lenience=p_over_eps", "--config.eval.epsilons=(0.5,)")
# The runs share compiled programs (same shapes, same dtypes) through JAX's persistent cache, small ones too.
JAX_ENV = {"JAX_PLATFORMS": "cpu", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("xla_cache")


def _snapshot(hf_home: pathlib.Path, hub_id: str, repo_type: str = "model") -> pathlib.Path:
    """The snapshot folder that refs/main names, in huggingface_hub's cache layout."""
    storage = hf_home / "hub" / f"{repo_type}s--{hub_id.replace('/', '--')}"
    revision = (storage / "refs" / "main").read_text()
    assert re.fullmatch(r"[0-9a-f]{40}", revision), revision
    return storage / "snapshots" / revision


def _hub_embedding(snapshot: pathlib.Path) -> np.ndarray:
    """model.embed_tokens.weight of a cached checkpoint, whichever shard holds it, as float32."""
    name = "model.embed_tokens.weight"
    return np.asarray(convert._open_weights(snapshot)[name].get_tensor(name), np.float32)


def _run_offline(workdir, divergence: str, preset: str, hf_home: pathlib.Path, xla_cache: pathlib.Path):
    config = f"configs/{divergence}.py" + (f":{preset}" if preset else "")
    return run_main(workdir, *SIZES, *(TIMED if not preset else UNTIMED), *(LOSSY if preset == LOSSY_PRESET else ()),
                    f"--config.compilation_cache={xla_cache}", config=config, env={**fake_hub.offline_env(hf_home), **JAX_ENV})


def _check_run(workdir: pathlib.Path, stdout: str, divergence: str, preset: str, hf_home: pathlib.Path,
               timed: bool) -> None:
    """What every real-preset run must leave: every stage's output, models converted from the hub cache with
    the preset's dtypes, a sweep row per (temperature, γ) before and after, and a distilled draft HF can load."""
    import transformers

    c = DIVERGENCE_CONFIGS[divergence].get_config(preset)
    draft_id, target_id = REAL_PAIRS[preset]
    assert (c.draft.model, c.target.model) == (draft_id, target_id)
    assert f"stages {','.join(STAGES)}; already done: none" in stdout

    # prepare: both hub ids converted, from the snapshot that the cache's refs/main names.
    for hub_id, param_dtype in ((target_id, c.target.param_dtype), (draft_id, c.draft.param_dtype)):
        converted = workdir / "models" / f"{hub_id.replace('/', '--')}-{param_dtype}"
        assert f"[prepare] converting {hub_id} to Orbax in {converted}" in stdout
        ours = convert.load_orbax(converted)
        np.testing.assert_array_equal(np.asarray(ours.embed[...], np.float32),
                                      _hub_embedding(_snapshot(hf_home, hub_id)))
    line = re.search(r"\[prepare\] target ([\d.]+)M params \((\w+) parameters, (\w+) compute\), "
                     r"draft ([\d.]+)M params \((\w+) parameters, (\w+) compute\), vocab (\d+)", stdout)
    assert line, stdout[-3000:]
    # The research dtypes: a bfloat16 teacher, and a draft with float32 master weights computing in bfloat16.
    assert line.group(2, 3, 5, 6) == ("bfloat16", "bfloat16", "float32", "bfloat16")
    assert int(line.group(7)) == fake_hub.QWEN3_VOCAB_SIZE
    for hub_id, millions in ((target_id, line.group(1)), (draft_id, line.group(4))):
        located = convert._open_weights(_snapshot(hf_home, hub_id))
        n_params = sum(int(np.prod(convert.tensor_shape(f, name))) for name, f in located.items())  # tied: no lm_head
        assert millions == f"{n_params / 1e6:.2f}", hub_id

    stored = json.loads((workdir / "config.json").read_text())
    assert stored["distill"]["remat"] is True and stored["distill"]["remat"] == c.distill.remat
    assert stored["distill"]["loss_chunk"] == c.distill.loss_chunk
    assert stored["distill"]["divergence"] == c.distill.divergence
    assert stored["data"]["name"] == "openai/gsm8k" and stored["data"]["config_name"] == "main"
    assert "[data] 4 training and 2 evaluation prompts (hf:openai/gsm8k)" in stdout

    res = json.loads((workdir / "results.json").read_text())
    keys = {(float(t), g) for t in c.eval.temperatures for g in GAMMAS}
    for when in ("before", "after"):
        assert {(r["temperature"], r["gamma"]) for r in res[when]} == keys, when
        for r in res[when]:
            assert 1.0 <= r["block_efficiency"] <= r["gamma"] + 1, r
            assert r["rows"] == 2 and r["target_calls"] > 0
            assert ("measured_speedup" in r) == timed
    # Every name the run wrote is one that overwrite=True discards (a stale expert_union.json must not survive).
    from distillspec_jax import experiment

    assert {p.name for p in workdir.iterdir()} <= set(experiment.OWNED), sorted(p.name for p in workdir.iterdir())
    if target_id in fake_hub.QWEN3_MOE_REPOS:  # the expert-union counts and the MoE prediction of v
        moe = fake_hub.TINY_MOE_SHAPE
        union = res["expert_union"]
        assert {(r["gamma"], r["batch"]) for r in union} == {(g, b) for g in GAMMAS for b in (1, 2)}
        for r in union:
            for count in ("experts_per_step", "experts_per_verify_row", "experts_per_verify_batch"):
                assert moe["num_experts_per_tok"] <= r[count] <= moe["num_experts"], (count, r)
            assert r["verify_cost_ratio_moe"] > 0
        assert all("verify_cost_ratio_moe" in r for r in res["before"] + res["after"])
    else:
        assert "expert_union" not in res
    assert res["run"]["target"] == target_id and res["run"]["draft"] == draft_id
    assert res["run"]["divergence"] == c.distill.divergence and res["training"]["steps"] == 2
    if preset == LOSSY_PRESET:  # the frontier at T = 1 per γ: the lossless row and p/ε at ε = 0.5, GSM8K scored
        for when in ("before", "after"):
            rows = res["frontier"][when]
            assert {(r["gamma"], r["lenience"], r["epsilon"]) for r in rows} == {
                (g, form, eps) for g in GAMMAS for form, eps in (("lossless", 1.0), ("p_over_eps", 0.5))}
            assert all(r["task_scored"] == 2 and 0.0 <= r["task_accuracy"] <= 1.0 for r in rows)
            assert all(r["law_tvd"] >= 0 and math.isfinite(r["log_likelihood"]) for r in rows)
        references = json.loads((workdir / "data" / "eval_references.json").read_text())
        assert len(references) == 2 and all(r["answer"] for r in references)
    else:
        assert "frontier" not in res
    assert "τ before" in stdout and "temperature 1" in stdout
    assert list((workdir / "plots").glob("*.png"))
    if c.distill.selection == "adaspec":
        assert "[distill] AdaSPEC reference draft: FKL for 2 steps" in stdout
        assert (workdir / "reference" / "metrics.jsonl").read_text()

    hf_dir = workdir / "distilled" / "hf"
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    assert hf.get_input_embeddings().weight.shape[0] == fake_hub.QWEN3_VOCAB_SIZE
    assert hf.config.tie_word_embeddings is fake_hub.QWEN3_REPOS[draft_id][0]
    assert len(transformers.AutoTokenizer.from_pretrained(hf_dir)) == QWEN3_NUM_TOKENS


# ----------------------------------------------------------------------------------------------
# The fixture cache
# ----------------------------------------------------------------------------------------------

_RESOLVE_OFFLINE = """
import json, sys, huggingface_hub, transformers, datasets
out = {"models": {}, "tokenizers": {}}
for hub_id in sys.argv[1].split(","):
    out["models"][hub_id] = huggingface_hub.snapshot_download(hub_id, local_files_only=True)
    out["tokenizers"][hub_id] = len(transformers.AutoTokenizer.from_pretrained(hub_id))
ds = datasets.load_dataset("openai/gsm8k", "main")
out["gsm8k"] = {split: {"rows": len(ds[split]), "columns": ds[split].column_names, "answer": ds[split][0]["answer"]}
                for split in ds}
print(json.dumps(out))
"""


def test_hf_cache_has_hubs_own_layout_and_resolves_offline(hf_cache):
    ids = list(fake_hub.QWEN3_REPOS)
    proc = subprocess.run([sys.executable, "-c", _RESOLVE_OFFLINE, ",".join(ids)], env=fake_hub.offline_env(hf_cache),
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for hub_id in ids:
        snapshot = _snapshot(hf_cache, hub_id)
        assert pathlib.Path(out["models"][hub_id]) == snapshot
        for file in snapshot.iterdir():  # every file is a relative symlink to its blob, as huggingface_hub writes
            assert file.is_symlink() and file.resolve().parent == snapshot.parents[1] / "blobs", file
        tied, sharded = fake_hub.QWEN3_REPOS[hub_id]
        hf_config = json.loads((snapshot / "config.json").read_text())
        assert hf_config["tie_word_embeddings"] is tied and hf_config["vocab_size"] == fake_hub.QWEN3_VOCAB_SIZE
        assert convert.missing_checkpoint_files(snapshot) == []
        if sharded:
            index = json.loads((snapshot / convert.INDEX_FILE).read_text())
            assert len(set(index["weight_map"].values())) > 1
            assert ("lm_head.weight" in index["weight_map"]) is not tied
        else:
            assert not (snapshot / convert.INDEX_FILE).exists() and (snapshot / "model.safetensors").is_file()
        assert out["tokenizers"][hub_id] == QWEN3_NUM_TOKENS
    assert {s: v["rows"] for s, v in out["gsm8k"].items()} == fake_hub.GSM8K_SPLITS
    for split in out["gsm8k"].values():
        assert split["columns"] == ["question", "answer"] and re.search(r"\n#### \d+$", split["answer"])
    dataset_snapshot = _snapshot(hf_cache, fake_hub.GSM8K_ID, "dataset")
    assert sorted(p.relative_to(dataset_snapshot).as_posix() for p in dataset_snapshot.rglob("*.parquet")) == [
        "main/test-00000-of-00001.parquet", "main/train-00000-of-00001.parquet"]
    assert list((hf_cache / "datasets" / "openai___gsm8k" / "main").glob("*/*/gsm8k-train.arrow"))


# ----------------------------------------------------------------------------------------------
# Offline: the default config, every preset, every divergence
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence, preset", RUNS, ids=[f"{d}:{p or 'default'}" for d, p in RUNS])
def test_real_preset_runs_every_stage_offline(divergence, preset, hf_cache, xla_cache, tmp_path):
    workdir = tmp_path / "run"
    proc = _run_offline(workdir, divergence, preset, hf_cache, xla_cache)
    _check_run(workdir, proc.stdout, divergence, preset, hf_cache, timed=not preset)


def test_runs_and_presets_cover_every_real_pair_and_divergence_file():
    assert {p for _, p in RUNS} == set(REAL_PAIRS)
    assert {d for d, _ in RUNS} == {p.stem for p in (REPO / "configs").glob("*.py")} - {"common", "__init__"}


# ----------------------------------------------------------------------------------------------
# Online: downloads from a Hub endpoint into an empty cache
# ----------------------------------------------------------------------------------------------


def test_real_preset_downloads_from_the_hub_into_an_empty_cache(hub_repos, xla_cache, tmp_path):
    home, workdir = tmp_path / "hf", tmp_path / "run"
    with fake_hub.FakeHub(hub_repos) as server:
        proc = run_main(workdir, *SIZES, *TIMED, f"--config.compilation_cache={xla_cache}",
                        config="configs/jsd.py:0.6b-8b", env={**fake_hub.online_env(home, server.url), **JAX_ENV})
        assert not server.unhandled(), server.unhandled()
        served = [r.path for r in server.requests if r.method == "GET" and r.status in (200, 206)]
    _check_run(workdir, proc.stdout, "jsd", "0.6b-8b", home, timed=True)
    for hub_id in REAL_PAIRS["0.6b-8b"]:  # the converter fetched what it loads, and nothing else
        repo_files = fake_hub.Repo.from_folder("model", hub_id, hub_repos[("model", hub_id)]).files
        wanted = {p for p in repo_files if any(fnmatch.fnmatch(p, pattern) for pattern in convert.HUB_PATTERNS)}
        snapshot = _snapshot(home, hub_id)
        assert {p.name for p in snapshot.iterdir()} == wanted
        assert any(path.startswith(f"/{hub_id}/resolve/") and path.endswith(".safetensors") for path in served)
    assert any(path.startswith("/datasets/openai/gsm8k/resolve/") and path.endswith(".parquet") for path in served)
    assert list((home / "datasets" / "openai___gsm8k" / "main").glob("*/*/gsm8k-test.arrow"))


def test_a_cached_tokenizer_alone_does_not_stand_in_for_the_checkpoint(hub_repos, tmp_path, monkeypatch):
    # AutoTokenizer.from_pretrained(id) leaves a snapshot folder with config.json and the tokenizer files only.
    # The converter must not take that folder for the checkpoint: offline it says what is missing, online it
    # downloads the weights.
    import huggingface_hub

    home, out = tmp_path / "hf", tmp_path / "converted"
    hub_id = "Qwen/Qwen3-1.7B"  # sharded, with an index
    with fake_hub.FakeHub(hub_repos) as server:
        env = fake_hub.online_env(home, server.url)
        tokenizer_only = f"import transformers; transformers.AutoTokenizer.from_pretrained({hub_id!r})"
        proc = subprocess.run([sys.executable, "-c", tokenizer_only], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        snapshot = _snapshot(home, hub_id)
        assert (snapshot / "tokenizer.json").exists() and not list(snapshot.glob("*.safetensors"))

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))  # offline (conftest)
        with pytest.raises(hub.HubUnreachableError, match=r"lacks .*safetensors"):
            convert.resolve_checkpoint(hub_id)

        convert_cli = [sys.executable, "-m", "distillspec_jax.models.convert", f"--hf={hub_id}", f"--out={out}"]
        proc = subprocess.run(convert_cli, env={**env, **JAX_ENV}, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert not server.unhandled(), server.unhandled()
    assert convert.missing_checkpoint_files(snapshot) == []
    np.testing.assert_array_equal(np.asarray(convert.load_orbax(out).embed[...], np.float32), _hub_embedding(snapshot))


@pytest.mark.parametrize("hub_state", ["HF_HUB_OFFLINE", "unreachable"])
def test_a_dataset_in_the_hub_cache_alone_loads_without_the_hub(hub_state, hf_cache, tmp_path, monkeypatch):
    # `huggingface-cli download openai/gsm8k --repo-type dataset` (snapshot_download) fills the HF hub cache
    # only; datasets reads its own arrow cache and never that one, so the loader reads the snapshot itself.
    import datasets
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_cache / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "no_arrow_cache"))
    if hub_state == "unreachable":  # not declared offline, and the probe finds no Hub
        monkeypatch.setattr(hub, "hub_offline", lambda: False)
        monkeypatch.setattr(hub, "probe_hub", lambda: "cannot connect to huggingface.co:443: unreachable")
    rows = sources.load("hf", fake_hub.GSM8K_ID, "main", "test")
    assert rows == fake_hub.gsm8k_rows("test", fake_hub.GSM8K_SPLITS["test"])
    with pytest.raises(sources.DataSourceError, match="has no split 'validation'"):
        sources.load("hf", fake_hub.GSM8K_ID, "main", "validation")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub_cache"))
    with pytest.raises(hub.HubUnreachableError, match="not in the local Hugging Face cache"):
        sources.load("hf", fake_hub.GSM8K_ID, "main", "test")


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def test_gsm8k_without_its_question_field_is_refused_before_any_model_loads(hub_repos, tmp_path):
    # openai/gsm8k as the default config reads it, but with the question column named `problem`.
    bad = {("dataset", fake_hub.GSM8K_ID): fake_hub.write_gsm8k_repo(tmp_path / "repo", rename={"question": "problem"})}
    home, workdir = tmp_path / "hf", tmp_path / "run"
    with fake_hub.FakeHub(bad) as server:
        fake_hub.populate_cache(home, server.url, models=())
    proc = run_main(workdir, *SIZES, config="configs/jsd.py", env={**fake_hub.offline_env(home), **JAX_ENV},
                    check=False)
    assert proc.returncode != 0
    assert re.search(r"openai/gsm8k.*row 1: no field 'question' \(found fields: answer, problem\); task 'gsm8k'",
                     proc.stderr), proc.stderr[-3000:]
    assert "[prepare]" not in proc.stdout and not (workdir / "models").exists()  # no model was touched
