"""DistillSpec with reverse KL, KL(q‖p): mode-seeking; the draft concentrates on the target's likely tokens."""

from configs import common


def get_config(arg: str | None = None):
    """The base config (preset `arg`, see configs/common.py) distilling with divergence 'rkl'."""
    c = common.get_config(arg)
    c.distill.divergence = "rkl"
    return c
