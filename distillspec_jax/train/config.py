"""TrainConfig: config.distill in one hop, `TrainConfig(**c.distill, seed=c.seed, stored_teacher=...)` (the last
follows from config.generator: whether it stores the teacher's logits). The loss's fields are declared once, in
`objective.LossSpec`, which TrainConfig extends with the optimizer's and the loop's."""

from __future__ import annotations

import dataclasses

from distillspec_jax.objective import LossSpec


@dataclasses.dataclass(frozen=True)
class TrainConfig(LossSpec):
    """The loss (LossSpec's fields), the optimizer and the loop. Validated on creation, before anything compiles."""

    reference_steps: int = 0  # steps of the token selection's reference run (AdaSPEC); 0 = `steps`
    steps: int = 1000  # optimizer steps of the run; the cosine decay reaches its floor here
    batch_size: int = 32  # global batch: sequences per optimizer step, split over data x fsdp
    grad_accum_steps: int = 1  # micro-batches per optimizer step; each global batch is split into this many
    learning_rate: float = 1e-4  # peak learning rate, reached at the end of warmup
    warmup_steps: int = 100  # optimizer steps of linear warmup from 0
    end_lr_fraction: float = 0.1  # cosine decay floor, as a fraction of learning_rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay, on matrices only (not norm weights)
    b1: float = 0.9  # Adam first-moment decay
    b2: float = 0.95  # Adam second-moment decay
    grad_clip_norm: float = 1.0  # clip gradients to this global norm; 0 disables clipping
    remat: bool = False  # recompute each draft layer in the backward pass (activation memory of the step)
    unroll_layers: bool = False  # lay out the layers and loss chunks one after another, not as loops (longer compile)
    checkpoint_every: int = 500  # steps between checkpoints (one is also written at the end and on SIGTERM)
    keep_checkpoints: int = 2  # most recent checkpoints kept on disk
    log_every: int = 10  # steps between metrics lines
    seed: int = 0  # seed of the run's RNG (data generation); on resume the checkpointed RNG is used

    def __post_init__(self):
        super().__post_init__()  # divergence, β, temperature, selection and its hyperparameters, chunk
        positive = ("steps", "batch_size", "grad_accum_steps", "checkpoint_every", "keep_checkpoints", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.reference_steps < 0:
            raise ValueError(f"reference_steps must be >= 0 (0 = steps), got {self.reference_steps}")
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(f"batch_size={self.batch_size} does not split into grad_accum_steps="
                             f"{self.grad_accum_steps} micro-batches")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.end_lr_fraction <= 1.0:
            raise ValueError(f"end_lr_fraction must be in [0, 1], got {self.end_lr_fraction}")
        if self.weight_decay < 0 or self.grad_clip_norm < 0:
            raise ValueError("weight_decay and grad_clip_norm must be >= 0")
        if not (0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0):
            raise ValueError(f"b1 and b2 must be in [0, 1), got b1={self.b1} b2={self.b2}")

    def loss_spec(self) -> LossSpec:
        """The loss alone: the static argument of the step (the loop's settings do not enter the program)."""
        return LossSpec(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LossSpec)})

    def reference_config(self) -> TrainConfig:
        """The reference run of a selection that needs one (AdaSPEC): the same draft, data and optimizer,
        trained on every token with the selection's reference divergence for `reference_steps` steps."""
        if not self.uses_reference:
            raise ValueError(f"token selection {self.selection!r} uses no reference draft")
        steps = self.reference_steps or self.steps
        return dataclasses.replace(self, divergence=self.token_selection.reference_divergence, selection="all",
                                   steps=steps, warmup_steps=min(self.warmup_steps, steps))
