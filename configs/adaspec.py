"""AdaSPEC (Hu et al., 2025): distil a reference draft with FKL, then train the draft with FKL on only the
fraction k of tokens whose loss gap to the reference is largest (tokens the draft can still learn)."""

from configs import common


def get_config(arg: str | None = None):
    """The base config (preset `arg`, see configs/common.py) with AdaSPEC selective token filtering."""
    c = common.get_config(arg)
    c.distill.divergence = "fkl"
    c.distill.selection = "adaspec"
    c.distill.adaspec_fraction = 0.4  # k: the AdaSPEC paper's default fraction of tokens kept
    return c
