"""A training run that the SIGTERM test interrupts: slow synthetic batches, a checkpoint only every
1000 steps, so the checkpoint it leaves can only come from the signal handler.

    python -m tests.sigterm_worker WORKDIR
Prints one JSON line: {"step": ..., "preempted": ...}.
"""

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

SIGTERM_CFG = dict(divergence="fkl", learning_rate=1e-2, warmup_steps=0, steps=1000, loss_chunk=8,
                   checkpoint_every=1000, log_every=1)
BATCH, SEQ, SLEEP_S = 4, 16, 0.2


def main() -> None:
    from distillspec_jax import sharding as shd
    from distillspec_jax import train
    from tests import distill_helpers as h

    cfg = train.TrainConfig(**SIGTERM_CFG)
    distiller = train.Distiller(cfg, h.make_draft(), h.make_target(), shd.single_device_mesh())
    result = train.run(distiller, h.SyntheticSource(BATCH, SEQ, sleep_s=SLEEP_S), sys.argv[1])
    print(json.dumps({"step": result.step, "preempted": result.preempted}), flush=True)


if __name__ == "__main__":
    main()
