"""DistillSpec-JAX: distil a draft toward a target and measure speculative decoding before and after.

    python main.py --config=configs/jsd.py --workdir=gs://bucket/run       # Qwen3-0.6B -> Qwen3-8B, GSM8K
    python main.py --config=configs/jsd.py:tiny --workdir=/tmp/jsd_tiny    # offline default, minutes on a CPU
    python main.py --config=configs/fkl.py:tiny --workdir=/tmp/fkl_tiny --config.distill.steps=300

Stages, resume and outputs: distillspec_jax/experiment.py and design §7.
"""

import logging as py_logging

from absl import app, flags, logging
from ml_collections import config_flags

from distillspec_jax import experiment

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<divergence>.py[:preset]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output folder, local or gs://; a rerun resumes it")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(py_logging.Filter):
    """Drops INFO lines of Orbax (several per checkpoint) so that stdout/stderr stay readable on a TPU worker."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def main(argv: list[str]) -> None:
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; settings go in --config.<field>=<value>")
    experiment.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
