"""One process of the multi-host test: started by tests/test_sharding.py with JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID set, 4 fake CPU devices each, jax.distributed over localhost.

    python -m tests.multihost_worker OUT_JSON WORKDIR [sigterm]

With `sigterm`, a long run that a SIGTERM to one process stops (distill_helpers.main_multihost_sigterm).
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"


def main() -> None:
    from distillspec_jax import sharding as shd

    if not shd.maybe_initialize_distributed():
        raise SystemExit("the environment did not ask for jax.distributed (JAX_COORDINATOR_ADDRESS unset)")
    from tests import distill_helpers

    body = distill_helpers.main_multihost_sigterm if sys.argv[3:] == ["sigterm"] else distill_helpers.main_multihost
    body(sys.argv[1], sys.argv[2], (2, 2, 2))


if __name__ == "__main__":
    main()
