"""DistillSpec-JAX: distil a draft toward a target and measure speculative decoding before and after.

    python main.py --config=configs/jsd.py --workdir=gs://bucket/run       # Qwen3-0.6B -> Qwen3-8B, GSM8K
    python main.py --config=configs/jsd.py:tiny --workdir=/tmp/jsd_tiny    # offline default, minutes on a CPU
    python main.py --config=configs/fkl.py:tiny --workdir=/tmp/fkl_tiny --config.distill.steps=300

Stages, resume and outputs: distillspec_jax/experiment.py and design §7. Exit codes: 0 finished, 1 failed,
75 stopped on request (SIGTERM) with its state saved: rerun to resume (distillspec_jax/errors.py).
"""

import logging as py_logging
import os
import re
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from distillspec_jax import errors, experiment

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<divergence>.py[:preset]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output folder, local or gs://; a rerun resumes it")
_VERBOSE = flags.DEFINE_bool("verbose", False, f"print tracebacks of input errors too (or {errors.TRACEBACK_ENV}=1)")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(py_logging.Filter):
    """Drops INFO lines of Orbax (several per checkpoint) so that stdout/stderr stay readable on a TPU worker."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def _tracebacks(argv: list[str]) -> bool:
    return os.environ.get(errors.TRACEBACK_ENV, "") not in ("", "0") or "--verbose" in argv


def _fail(message: str) -> None:
    print(f"main.py: error: {message}", file=sys.stderr, flush=True)
    sys.exit(errors.EXIT_FAILED)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with an unknown config field said in one line (ml_collections raises it
    as a chain of KeyErrors and AttributeErrors, not as a flags error that absl would print)."""
    try:
        return flags.FLAGS(argv)
    except (KeyError, AttributeError) as err:
        if _tracebacks(argv):
            raise
        text = _innermost_text(err)
        lines = text.splitlines() or ["?"]
        key = lines[0].strip("'\"")
        given = next((a.split("=")[0] for a in argv if a.startswith("--config.") and key in a.split("=")[0]), key)
        match = re.search(r'Did you mean "([^"]+)"', text)
        fix = (f"--{given.removeprefix('--').rsplit('.', 1)[0]}.{match.group(1)}" if match else
               "correct the name (every field, with its comment: configs/common.py)")
        closest = " (did you mean it? every field, with its comment: configs/common.py)" if match else ""
        _fail(f"{given}: no such config field {key!r}; fix: {fix}{closest}")


def _innermost_text(err: BaseException) -> str:
    """The message of the chain's KeyError that holds text (ml_collections wraps it twice)."""
    current = err
    while current is not None:
        if current.args and isinstance(current.args[0], str) and "Did you mean" in current.args[0]:
            return current.args[0]
        current = current.__cause__ or current.__context__
    return str(err.args[0]) if err.args else str(err)


def _stop_on_sigterm(signum, frame) -> None:
    """SIGTERM outside the training loop (which checkpoints first): stop where we are. Every stage's file
    is written atomically and a stage that did not finish runs again, so a rerun resumes correctly."""
    del signum, frame
    raise errors.Preempted("stopped by SIGTERM")


def _plot(workdir: str) -> None:
    """The run's figures from its results.json (analysis.plots), written to <workdir>/plots by process 0."""
    import jax

    from analysis import plots

    if jax.process_index() == 0:
        plots.write_all([workdir], os.path.join(workdir, "plots"))


def main(argv: list[str]) -> None:
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; settings go in --config.<field>=<value>")
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        results = experiment.run(_CONFIG.value, _WORKDIR.value)
        if results is not None and _CONFIG.value.plots:
            _plot(_WORKDIR.value)
    except errors.Preempted as stop:
        print(f"[run] {stop}; exiting with {errors.EXIT_PREEMPTED}: rerun the same command to resume", flush=True)
        sys.exit(errors.EXIT_PREEMPTED)
    except errors.UserError as err:
        if _VERBOSE.value or _tracebacks([]):
            raise
        _fail(str(err))


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
