"""Stage `prepare`: the two models and the tokenizer, on the mesh.

Owns config.target, config.draft, config.tiny and config.tokenizer, and the workdir's model cache
(`models/`, or config.tiny.cache_dir): a HF checkpoint is converted to Orbax once per source revision
(model_sources), the `:tiny` pair is built once, and every run loads them from there. It writes no stage file:
every other stage that needs the models runs it first.

The target is loaded on first use (`Models.target`), after every check has passed on its config: a run whose
stages never read it (training from stored teacher outputs, cross-entropy) never holds it in memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable
from typing import Any

import jax
from ml_collections import ConfigDict

from distillspec_jax import checks, files, model_sources
from distillspec_jax import workdir as wd
from distillspec_jax.models import catalog, convert, qwen3

TINY = checks.TINY  # model source / tokenizer name of the embedded offline default
OFFLINE_QWEN3_TOKENIZER = "qwen3_offline"
EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")  # end a chat turn / a document; both end a generated response
MODELS_DIR = "models"
XLA_CACHE_DIR = "xla_cache"  # JAX's persistent compilation cache, beside the cached models


@dataclasses.dataclass
class Models:
    load_target: Callable[[], qwen3.Qwen3]  # loads the target onto the mesh (once, on first use of `target`)
    draft: qwen3.Qwen3  # the initial (undistilled) draft
    tokenizer: Any
    draft_dir: str  # the draft's Orbax folder (reloaded for a fresh copy, e.g. AdaSPEC's reference)
    target_cfg: qwen3.Qwen3Config  # the target's config, known without loading it
    _target: qwen3.Qwen3 | None = None

    @property
    def target(self) -> qwen3.Qwen3:
        if self._target is None:
            self._target = self.load_target()
            print(f"[prepare] target loaded: {describe_model(self._target.cfg)}", flush=True)
        return self._target

    @property
    def target_loaded(self) -> bool:
        return self._target is not None

    @property
    def eos_ids(self) -> tuple[int, ...]:
        vocab = self.tokenizer.get_vocab()
        ids = {vocab[t] for t in EOS_TOKENS if t in vocab}
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return tuple(sorted(ids))

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    @property
    def tokenizer_dir(self) -> str | None:
        """The tokenizer's local folder (exported beside a distilled draft), if it has one."""
        path = self.tokenizer.name_or_path
        return path if path and os.path.isdir(path) else None


def _cache_name(source: str, param_dtype: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "--", source.strip("/")) + f"-{param_dtype}"


def converted(source: str, param_dtype: str, cache: wd.epath.Path, mesh) -> str:
    """Orbax folder of a HF checkpoint (with its tokenizer files), converted on first use and again
    whenever its source changed (model_sources: hub revision, or the local folder's fingerprint)."""
    return model_sources.converted(source, param_dtype, cache / _cache_name(source, param_dtype), mesh)


def _load_tokenizer(c: ConfigDict, target_dir: str, tiny_tokenizer: str | None):
    from distillspec_jax import tokenizer as tok

    if c.tokenizer == TINY or (not c.tokenizer and tiny_tokenizer):
        return tok.load_tokenizer(tiny_tokenizer)
    if c.tokenizer == OFFLINE_QWEN3_TOKENIZER:
        return tok.offline_qwen3_tokenizer()
    if c.tokenizer:
        return tok.load_tokenizer(c.tokenizer)
    local = os.path.join(target_dir, convert.TOKENIZER_DIR)
    return tok.load_tokenizer(local if os.path.isdir(local) else c.target.model)


def model_cache(c: ConfigDict, workdir: str) -> wd.epath.Path:
    """Where converted (or built) models are cached: config.tiny.cache_dir, else <workdir>/models; the
    tiny models of a gs:// workdir are built with local files, so they go to the local cache root."""
    if c.tiny.cache_dir:
        return wd.path(c.tiny.cache_dir)
    if c.target.model == TINY and files.is_remote(workdir):
        from distillspec_jax import tokenizer as tok

        return wd.path(str(tok.cache_root() / "tiny"))
    return wd.path(workdir, MODELS_DIR)


def enable_compilation_cache(c: ConfigDict, workdir: str) -> str | None:
    """Turns on JAX's persistent compilation cache, so a rerun (or another run sharing the model cache)
    loads compiled decode loops and train steps instead of compiling them again."""
    if not c.compilation_cache:
        return None
    folder = str(model_cache(c, workdir) / XLA_CACHE_DIR) if c.compilation_cache == "auto" else c.compilation_cache
    jax.config.update("jax_compilation_cache_dir", folder)
    return folder


def tiny_models(c: ConfigDict, workdir: str):
    """The `:tiny` tokenizer, target and draft: built once per tiny config and seed, then found in the cache."""
    from distillspec_jax import tiny

    build_cfg = {k: v for k, v in c.tiny.to_dict().items() if k not in ("cache_dir", "model_seed")}
    return tiny.build(build_cfg, c.seed if c.tiny.model_seed < 0 else c.tiny.model_seed, str(model_cache(c, workdir)))


def prepare(c: ConfigDict, workdir: str, mesh) -> Models:
    """Converts (once) and loads both models on the mesh; checks they share a vocabulary before loading."""
    cache = model_cache(c, workdir)
    tiny_tokenizer = None
    if c.target.model == TINY:
        built = tiny_models(c, workdir)
        target_dir, draft_dir, tiny_tokenizer = str(built.target), str(built.draft), str(built.tokenizer)
    else:
        target_dir = converted(c.target.model, c.target.param_dtype, cache, mesh)
        draft_dir = converted(c.draft.model, c.draft.param_dtype, cache, mesh)
    target_cfg, draft_cfg = (json.loads(wd.path(d, convert.ORBAX_CONFIG).read_text()) for d in (target_dir, draft_dir))
    positions = [cfg.get("max_position_embeddings", qwen3.Qwen3Config.max_position_embeddings)
                 for cfg in (target_cfg, draft_cfg)]
    checks.check_positions(c, min(positions), f"target {positions[0]}, draft {positions[1]}")  # before loading
    checks.check_same_vocabulary(draft_cfg, target_cfg, "target", "DistillSpec")  # before loading
    overrides = dict(dtype=c.target.dtype, param_dtype=c.target.param_dtype)
    target = catalog.config_from_dict({k: v for k, v in target_cfg.items() if k != convert.LEGACY_CONFIG_FIELD_REMAT},
                                      **overrides)
    draft = load_draft(c, draft_dir, mesh)
    tokenizer = _load_tokenizer(c, target_dir, tiny_tokenizer)
    if len(tokenizer) > target.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the models only {target.vocab_size} "
                         "rows; config.tokenizer does not belong to these models")
    print(f"[prepare] target {describe_model(target)}, draft {describe_model(draft.cfg)}, vocab "
          f"{target.vocab_size}", flush=True)
    return Models(lambda: convert.load_orbax(target_dir, mesh, **overrides), draft, tokenizer, draft_dir, target)


def describe_model(cfg: qwen3.Qwen3Config) -> str:
    """'596.05M params (float32 parameters, bfloat16 compute)': both dtypes, since a draft's float32 master
    weights and its bfloat16 arithmetic differ."""
    return f"{cfg.num_params() / 1e6:.2f}M params ({cfg.param_dtype} parameters, {cfg.dtype} compute)"


def load_draft(c: ConfigDict, directory: str, mesh) -> qwen3.Qwen3:
    """A draft from an Orbax folder, in config.draft's dtypes."""
    return convert.load_orbax(str(directory), mesh, dtype=c.draft.dtype, param_dtype=c.draft.param_dtype)


def run(state) -> None:
    state.models = prepare(state.config, state.workdir, state.mesh)
