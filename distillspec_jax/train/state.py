"""What the train step replaces (TrainState) and where every buffer of the step lives on the mesh."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from distillspec_jax import sharding as shd

Params = dict[str, Any]  # nested dict of arrays, nnx.to_pure_dict layout


class TrainState(NamedTuple):
    """What the step replaces: the draft's parameters and the optimizer state (both donated)."""

    params: Params
    opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class Shardings:
    """Where each buffer of the step lives: the draft's parameters and the optimizer state like the draft
    (Adam's moments) or replicated (step counts), the frozen models like themselves, batches over
    ('data', 'fsdp'), metrics replicated."""

    params: Params
    opt_state: Any
    frozen: dict[str, Params]
    batch: dict[str, NamedSharding]
    replicated: NamedSharding

    @property
    def state(self) -> TrainState:
        return TrainState(self.params, self.opt_state)


def _opt_state_shardings(abstract_opt_state, params_shardings: Params, mesh: Mesh):
    """Every subtree of an optax state shaped like the parameters (Adam's moments) is sharded like them;
    everything else (step counts) is replicated."""
    params_def = jax.tree.structure(params_shardings)

    def params_like(node) -> bool:
        return isinstance(node, dict) and jax.tree.structure(node) == params_def

    return jax.tree.map(lambda node: params_shardings if params_like(node) else shd.replicated(mesh),
                        abstract_opt_state, is_leaf=params_like)


def shardings(draft_state: nnx.State, frozen: dict[str, Params], tx: optax.GradientTransformation,
              mesh: Mesh, batch_ranks: dict[str, int]) -> Shardings:
    """The step's shardings, from the draft's NNX state (its annotations) and the placed frozen models."""
    params = nnx.to_pure_dict(shd.state_shardings(draft_state, mesh))
    abstract_opt_state = jax.eval_shape(tx.init, nnx.to_pure_dict(draft_state))
    return Shardings(params=params, opt_state=_opt_state_shardings(abstract_opt_state, params, mesh),
                     frozen=jax.tree.map(lambda x: x.sharding, frozen),
                     batch={key: shd.batch_sharding(mesh, rank) for key, rank in batch_ranks.items()},
                     replicated=shd.replicated(mesh))


def _with_shardings(abstract, shardings_):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings_)


def abstract_state(abstract_params: Params, tx: optax.GradientTransformation, where: Shardings) -> TrainState:
    """Shapes, dtypes and shardings of the state, for restoring a checkpoint straight onto the mesh."""
    return TrainState(_with_shardings(abstract_params, where.params),
                      _with_shardings(jax.eval_shape(tx.init, abstract_params), where.opt_state))


def split_frozen(model: nnx.Module, mesh: Mesh) -> tuple[nnx.GraphDef, Params]:
    """A frozen model's graphdef and its parameters placed on their shardings (no copy when already there)."""
    graphdef, state = nnx.split(model)
    return graphdef, shd.place(nnx.to_pure_dict(state), nnx.to_pure_dict(shd.state_shardings(state, mesh)))
