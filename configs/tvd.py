"""DistillSpec with total variation ½Σ|p−q|: directly maximises the token acceptance 1 − TVD."""

from configs import common


def get_config(arg: str | None = None):
    """The base config (preset `arg`, see configs/common.py) distilling with divergence 'tvd'."""
    c = common.get_config(arg)
    c.distill.divergence = "tvd"
    return c
