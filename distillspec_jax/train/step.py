"""The train step, its gradients and the loss evaluation: pure functions closed over the models' graphdefs
and the loss, for `jax.jit` (design §3, §6).

The draft's parameters travel as a plain nested dict (`nnx.to_pure_dict` layout) together with the optax
state (`TrainState`, donated and returned). The frozen models (the target, a selection's reference draft)
are arguments too, a dict of parameters by role, and are never differentiated. Their numerics are the
caller's choice when loading them (bfloat16 compute for the target by default in the configs; a float32
target makes the step exact for tests).

A batch is a dict of [B, T] arrays: `tokens` (int32, prompt + response, right padded) and `loss_mask`
(1 where position t's next-token distribution, the one generating token t + 1, is trained; see
`objective.next_token_loss_mask`); with a stored teacher also its top-k ids and log-probabilities [B, T, k]
and tail [B, T] (`sparse_teacher.TEACHER_KEYS`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from distillspec_jax import objective
from distillspec_jax import sharding as shd
from distillspec_jax.data.source import Batch
from distillspec_jax.objective import DRAFT, LossSpec
from distillspec_jax.train.state import Params, TrainState

Graphdefs = dict[str, nnx.GraphDef]  # by role: draft, target, reference
Metrics = dict[str, jax.Array]


def token_values(spec: LossSpec, graphdefs: Graphdefs, params: Params, frozen: dict[str, Params],
                 batch: Batch, *, remat: bool = False, unroll: bool = False) -> objective.TokenValues:
    """Per-position values [B, T] of the loss for the draft `params` against the frozen models (or the
    batch's stored teacher)."""
    tokens_bt = batch["tokens"]
    draft = nnx.merge(graphdefs[DRAFT], params)
    heads, hidden_btd = {DRAFT: draft.logits}, {DRAFT: draft.hidden_states(tokens_bt, remat=remat, unroll=unroll)}
    for role in spec.frozen_roles:
        model = nnx.merge(graphdefs[role], frozen[role])
        heads[role], hidden_btd[role] = model.logits, jax.lax.stop_gradient(model.hidden_states(tokens_bt, unroll=unroll))
    return objective.token_values(spec, draft.cfg.real_vocab_size, heads, hidden_btd,
                                  objective.next_token_shift(tokens_bt), batch, unroll=unroll)


def _micro(x_bt: jax.Array, accum: int, mesh: Mesh) -> jax.Array:
    """[B, T, ...] -> [A, B/A, T, ...]. Micro-batch a takes rows a, a + A, a + 2A, ...: every batch shard holds
    the same number of rows of each micro-batch, so splitting moves no data between devices."""
    x_abt = jnp.swapaxes(x_bt.reshape(x_bt.shape[0] // accum, accum, *x_bt.shape[1:]), 0, 1)
    partition = PartitionSpec(None, shd.BATCH_AXES, *([None] * (x_bt.ndim - 1)))
    return jax.lax.with_sharding_constraint(x_abt, NamedSharding(mesh, partition))


def _unmicro(x_abt: jax.Array) -> jax.Array:
    return jnp.swapaxes(x_abt, 0, 1).reshape(-1, *x_abt.shape[2:])


def make_gradients(spec: LossSpec, graphdefs: Graphdefs, mesh: Mesh, *, grad_accum_steps: int = 1,
                   remat: bool = False, unroll: bool = False
                   ) -> Callable[[Params, dict[str, Params], Batch], tuple[Params, Metrics]]:
    """`gradients(params, frozen, batch) -> (grads, metrics)`: the gradient of the loss Σ w·D / Σ w over the
    global batch, accumulated over `grad_accum_steps` micro-batches, cast to the parameters' dtypes."""

    def loss_sum(params, frozen, batch, weights_bt):
        """Σ w·D over one (micro-)batch, and the metric sums. weights None: from this pass (the selection
        included); otherwise given, already selected over the whole global batch."""
        values = token_values(spec, graphdefs, params, frozen, batch, remat=remat, unroll=unroll)
        if weights_bt is None:
            weights_bt = objective.loss_weights(spec, batch["loss_mask"], values.score)
        return (jnp.sum(weights_bt * values.divergence),
                objective.metric_sums(spec, values, batch["loss_mask"], weights_bt))

    grad_fn = jax.grad(loss_sum, has_aux=True)

    def grads_and_sums(params, frozen, batch):
        if grad_accum_steps == 1:
            return grad_fn(params, frozen, batch, None)
        micro = jax.tree.map(lambda x: _micro(x, grad_accum_steps, mesh), batch)  # every array [A, B/A, ...]
        score_bt = None
        if spec.uses_reference:
            # A selection ranks tokens over the whole global batch, so every micro-batch's score is needed
            # before any gradient: one extra forward pass, the price of matching the big batch exactly.
            score_bt = _unmicro(jax.lax.map(lambda b: token_values(spec, graphdefs, params, frozen, b).score, micro))
        weights_abt = _micro(objective.loss_weights(spec, batch["loss_mask"], score_bt), grad_accum_steps, mesh)

        def accumulate(carry, xs):
            grads, sums = grad_fn(params, frozen, *xs)
            return jax.tree.map(jnp.add, carry, (grads, sums)), None

        first = jax.tree.map(lambda x: x[0], micro)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32),
                             jax.eval_shape(grad_fn, params, frozen, first, weights_abt[0]))
        (grads, sums), _ = jax.lax.scan(accumulate, zeros, (micro, weights_abt))
        return grads, sums

    def gradients(params, frozen, batch):
        grads, sums = grads_and_sums(params, frozen, batch)
        # The loss is Σ w·D / Σ w over the global batch; Σ w does not depend on the parameters.
        norm = jnp.maximum(sums["weight_sum"], 1.0)
        grads = jax.tree.map(lambda g, p: (g / norm).astype(p.dtype), grads, params)
        metrics = objective.finalize_metrics(spec, sums)
        metrics["grad_norm"] = optax.tree.norm(grads)
        # The non-finite guard's test, on the device: the loop reads it when it pulls the metrics.
        metrics["finite"] = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        return grads, metrics

    return gradients


def make_train_step(spec: LossSpec, graphdefs: Graphdefs, tx: optax.GradientTransformation, mesh: Mesh, *,
                    grad_accum_steps: int = 1, remat: bool = False, unroll: bool = False
                    ) -> Callable[[TrainState, dict[str, Params], Batch], tuple[TrainState, Metrics]]:
    """`train_step(state, frozen, batch) -> (state, metrics)`: the gradients, then one optimizer update."""
    gradients = make_gradients(spec, graphdefs, mesh, grad_accum_steps=grad_accum_steps, remat=remat, unroll=unroll)

    def train_step(state: TrainState, frozen: dict[str, Params], batch: Batch) -> tuple[TrainState, Metrics]:
        grads, metrics = gradients(state.params, frozen, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return TrainState(optax.apply_updates(state.params, updates), opt_state), metrics

    return train_step


def make_loss_metrics(spec: LossSpec, graphdefs: Graphdefs) -> Callable[[Params, dict[str, Params], Batch], Metrics]:
    """`loss_metrics(params, frozen, batch) -> metrics`: the loss's metrics without a gradient."""

    def loss_metrics(params: Params, frozen: dict[str, Params], batch: Batch) -> Metrics:
        values = token_values(spec, graphdefs, params, frozen, batch)
        return objective.reduce_loss(spec, values, batch["loss_mask"])[1]

    return loss_metrics
