"""DistillSpec with the generalised Jensen-Shannon divergence JSD[β] (β = 0.5: the symmetric JSD)."""

from configs import common


def get_config(arg: str | None = None):
    """The base config (preset `arg`, see configs/common.py) distilling with JSD[0.5]."""
    c = common.get_config(arg)
    c.distill.divergence = "jsd"
    c.distill.jsd_beta = 0.5  # β: weight of KL(p‖m); m = β·p + (1−β)·q
    return c
