"""What a run can end with, and how `main.py` reports it.

A `UserError` is a fault of the input (a config field, the workdir, the data, a busy or corrupt
workdir): its message already says what was found and how to fix it, so `main.py` prints that one
line without a traceback (`--verbose` or DISTILLSPEC_TRACEBACK=1 shows it). Every other exception is a
bug or an environment failure and keeps its traceback.

Exit codes of `main.py` (the launch scripts act on them; docs/launch.md):
    0   finished (or the configured stages are done)
    1   failed: an error was printed
    75  stopped on request (SIGTERM, preemption) with its state saved; rerun the same command to resume.
        75 is EX_TEMPFAIL of sysexits.h, "try again later"; distinct from 143 (128 + SIGTERM), which
        a process killed by SIGTERM without saving would give.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_PREEMPTED = 75
TRACEBACK_ENV = "DISTILLSPEC_TRACEBACK"  # =1: print the traceback of user errors too


class UserError(Exception):
    """An error whose message names what was found and the fix; printed in one line by main.py."""


class ConfigError(UserError, ValueError):
    """A config field has a value the run cannot use: `config.X = value: must be ...; fix: ...`."""


class Preempted(Exception):
    """The run stopped on request (SIGTERM) after saving what it had; rerunning resumes it."""


def field_error(field: str, value, must: str, fix: str) -> ConfigError:
    """The one form of a config error: `config.<field> = <value>: must be <must>; fix: <fix>`."""
    return ConfigError(f"config.{field} = {value!r}: must be {must}; fix: {fix}")
