"""Black-box distillation (sequence-level KD): cross-entropy on the target's sampled text, no teacher
distributions. The white-box counterpart on the same text is configs/fkl.py with --config.generator.kind=target:
with the same seed both train on identical responses, so the comparison is one switch (Hong et al. 2025)."""

from configs import common


def get_config(arg: str | None = None):
    """The base config (preset `arg`, see configs/common.py) trained with cross-entropy on target-generated text."""
    c = common.get_config(arg)
    c.distill.divergence = "ce"
    c.generator.kind = "target"
    return c
