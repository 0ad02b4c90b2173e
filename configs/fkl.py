"""DistillSpec with forward KL, KL(p‖q): mode-covering; the classic KD objective."""

from configs import common


def get_config(arg: str | None = None):
    """The base config (preset `arg`, see configs/common.py) distilling with divergence 'fkl'."""
    c = common.get_config(arg)
    c.distill.divergence = "fkl"
    return c
