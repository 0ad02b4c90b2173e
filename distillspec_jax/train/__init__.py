"""Distillation training, in pieces that each do one thing (design §3, §6, §7):

- `config`: TrainConfig, config.distill in one hop (the loss's fields are `objective.LossSpec`'s)
- `optimizer`: the learning-rate schedule and AdamW
- `state`: TrainState and where each buffer of the step lives (shardings)
- `step`: the pure train step, gradients and evaluation, closed over the graphdefs and the loss
- `distiller`: one draft and its frozen models on one mesh: the jitted step and the batch checks
- `loop`: the loop (checkpoints via `distillspec_jax.checkpoint`, resume, SIGTERM, the non-finite guard,
  metrics) and `pretrain`, the same step and loop for next-token pre-training

The names below are the package's public API.
"""

from distillspec_jax.train.config import TrainConfig
from distillspec_jax.train.distiller import Distiller, check_batch
from distillspec_jax.train.loop import LoopResult, NonFiniteLossError, pretrain, run
from distillspec_jax.train.optimizer import is_matrix, learning_rate_schedule, make_optimizer
from distillspec_jax.train.state import Params, TrainState
from distillspec_jax.train.step import make_loss_metrics, make_gradients, make_train_step

__all__ = ["Distiller", "LoopResult", "NonFiniteLossError", "Params", "TrainConfig", "TrainState", "check_batch",
           "is_matrix", "learning_rate_schedule", "make_loss_metrics", "make_gradients", "make_optimizer",
           "make_train_step", "pretrain", "run"]
