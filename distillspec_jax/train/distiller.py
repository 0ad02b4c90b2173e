"""Distiller: one draft trained against its frozen models on one mesh. It splits and places the models,
jits the pure step of `step.py` with the shardings of `state.py`, and checks every batch before anything
compiles."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from distillspec_jax import checks
from distillspec_jax import sharding as shd
from distillspec_jax.data.source import Batch, batch_ranks
from distillspec_jax.models import qwen3
from distillspec_jax.objective import DRAFT, REFERENCE, TARGET
from distillspec_jax.train import state as st
from distillspec_jax.train import step as train_step
from distillspec_jax.train.config import TrainConfig
from distillspec_jax.train.optimizer import learning_rate_schedule, make_optimizer
from distillspec_jax.train.state import Params, TrainState

_NEEDED_BY = {TARGET: "the divergence {divergence!r} needs a target model",
              REFERENCE: "token selection {selection!r} needs the reference draft (same init, distilled with "
                         "{reference})"}
_VOCABULARY_USE = {TARGET: "distillation", REFERENCE: "the selection's score against the reference"}


def check_batch(batch: Batch, cfg: TrainConfig, mesh: Mesh, draft_cfg: qwen3.Qwen3Config, max_positions: int) -> None:
    """Shapes of a global batch; raises before compiling when it cannot be split as configured."""
    ranks = batch_ranks(cfg.stored_teacher)
    missing = [k for k in ranks if k not in batch]
    if missing:
        held = "tokens and loss_mask [B, T]" + (", teacher ids and log-probabilities [B, T, k] and tail [B, T]"
                                                 if cfg.stored_teacher else "")
        raise ValueError(f"batch lacks {missing}; a batch of this loss holds {held}")
    shape = tuple(batch["tokens"].shape)
    if len(shape) != 2 or tuple(batch["loss_mask"].shape) != shape:
        raise ValueError(f"tokens and loss_mask must both be [B, T]; got {shape} and {tuple(batch['loss_mask'].shape)}")
    if cfg.stored_teacher:
        k = batch["teacher_ids"].shape[-1]
        for key, rank in ranks.items():
            want = shape + (k,) * (rank - 2)
            if tuple(batch[key].shape) != want:
                raise ValueError(f"{key} must be {want} beside tokens {shape}; got {tuple(batch[key].shape)}")
        if k > draft_cfg.real_vocab_size:
            raise ValueError(f"the stored teacher keeps k={k} ids per position but the draft's vocabulary has "
                             f"{draft_cfg.real_vocab_size}")
    if shape[1] > max_positions:
        raise ValueError(f"batches of {shape[1]} positions exceed the models' max_position_embeddings="
                         f"{max_positions}; shorten the sequences (in main.py: data.max_prompt_len, "
                         "data.max_response_len or generator.max_new_tokens)")
    checks.check_token_ids(draft_cfg, batch["tokens"], "the batch's tokens")
    accum = cfg.grad_accum_steps
    if shape[0] % accum:
        raise ValueError(f"global batch {shape[0]} does not split into grad_accum_steps={accum} micro-batches")
    shd.check_batch_divides(shape[0] // accum, mesh,
                            "global batch" if accum == 1 else f"micro-batch (global batch / {accum})")


class Distiller:
    """The jitted train step, gradients and evaluation for one draft and its frozen models on one mesh.

    The frozen models the loss reads (`cfg.frozen_roles`: the target, a selection's reference draft) must
    be given; vocabularies and shapes are checked here and in `check_batch`, before anything compiles.
    The draft passed in is consumed: its parameters become the training state, whose buffers each step
    donates (so no second copy of the draft lives on the devices). Reload the draft to use it afterwards.
    """

    def __init__(self, cfg: TrainConfig, draft: qwen3.Qwen3, target: qwen3.Qwen3 | None, mesh: Mesh,
                 reference: qwen3.Qwen3 | None = None):
        self.cfg, self.spec, self.mesh = cfg, cfg.loss_spec(), mesh
        given = {TARGET: target, REFERENCE: reference}
        for role in self.spec.frozen_roles:
            if given[role] is None:
                raise ValueError(_NEEDED_BY[role].format(divergence=cfg.divergence, selection=cfg.selection,
                                                         reference=cfg.token_selection.reference_divergence.upper()))
            checks.check_same_vocabulary(draft.cfg, given[role].cfg, f"{role} draft" if role == REFERENCE else role,
                                         _VOCABULARY_USE[role])
        models = {DRAFT: draft, **{role: given[role] for role in self.spec.frozen_roles}}
        self.draft_cfg = draft.cfg
        # RoPE would run past the positions the models were trained for without any error: refuse it.
        self.max_positions = min(m.cfg.max_position_embeddings for m in models.values())
        self.graphdefs, self.frozen = {}, {}
        for role in self.spec.frozen_roles:
            self.graphdefs[role], self.frozen[role] = st.split_frozen(models[role], mesh)
        self.graphdefs[DRAFT], draft_state = nnx.split(draft)
        self._initial_params: Params | None = nnx.to_pure_dict(draft_state)
        self.tx, self.schedule = make_optimizer(cfg), learning_rate_schedule(cfg)
        self.shardings = st.shardings(draft_state, self.frozen, self.tx, mesh, batch_ranks(cfg.stored_teacher))
        self._abstract_params = jax.eval_shape(lambda: self._initial_params)
        where = self.shardings
        fns = dict(grad_accum_steps=cfg.grad_accum_steps, remat=cfg.remat, unroll=cfg.unroll_layers)
        self._step = jax.jit(train_step.make_train_step(self.spec, self.graphdefs, self.tx, mesh, **fns),
                             in_shardings=(where.state, where.frozen, where.batch),
                             out_shardings=(where.state, where.replicated), donate_argnums=(0,))
        self._gradients = jax.jit(train_step.make_gradients(self.spec, self.graphdefs, mesh, **fns),
                                  in_shardings=(where.params, where.frozen, where.batch),
                                  out_shardings=(where.params, where.replicated))
        self._loss_metrics = jax.jit(train_step.make_loss_metrics(self.spec, self.graphdefs),
                             in_shardings=(where.params, where.frozen, where.batch), out_shardings=where.replicated)
        self._init_opt = jax.jit(self.tx.init, in_shardings=(where.params,), out_shardings=where.opt_state)

    def draft_model(self, params: Params) -> qwen3.Qwen3:
        """The draft as an NNX model holding `params` (e.g. for on-policy generation)."""
        return nnx.merge(self.graphdefs[DRAFT], params)

    def init_state(self) -> TrainState:
        """The draft's initial parameters on their shardings and a fresh optimizer state (once)."""
        if self._initial_params is None:
            raise RuntimeError("init_state can be called once; the initial parameters were released")
        params = shd.place(self._initial_params, self.shardings.params)
        self._initial_params = None  # do not keep a second copy of the draft alive during training
        return TrainState(params, self._init_opt(params))

    def release_initial_params(self) -> None:
        """Drops the reference to the draft's initial parameters (a resumed run never needs them)."""
        self._initial_params = None

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the state, for restoring a checkpoint straight onto the mesh."""
        return st.abstract_state(self._abstract_params, self.tx, self.shardings)

    def check_batch(self, batch: Batch) -> None:
        check_batch(batch, self.cfg, self.mesh, self.draft_cfg, self.max_positions)

    def global_batch(self, local: Batch) -> Batch:
        """This host's rows -> global arrays sharded over ('data', 'fsdp'), checked."""
        dtypes = {"tokens": np.int32, "loss_mask": np.float32, "teacher_ids": np.int32,
                  "teacher_logprobs": np.float32, "teacher_tail": np.float32}
        arrays = {k: np.asarray(local[k], dtypes[k]) for k in batch_ranks(self.cfg.stored_teacher) if k in local}
        batch = shd.global_batch_dict(arrays, self.mesh)
        self.check_batch(batch)
        return batch

    def _checked(self, batch: Batch) -> Batch:
        self.check_batch(batch)
        return {k: batch[k] for k in batch_ranks(self.cfg.stored_teacher)}

    def step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer step on a global batch; `state` is donated (do not use it afterwards)."""
        return self._step(state, self.frozen, self._checked(batch))

    def gradients(self, params: Params, batch: Batch) -> tuple[Params, dict[str, jax.Array]]:
        """The step's gradient (accumulated over micro-batches as the step does) and metrics, without an update."""
        return self._gradients(params, self.frozen, self._checked(batch))

    def loss_metrics(self, params: Params, batch: Batch) -> dict[str, jax.Array]:
        """Loss metrics of `params` on a global batch, without an update."""
        return self._loss_metrics(params, self.frozen, self._checked(batch))
