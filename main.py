"""DistillSpec-JAX entry point: python main.py --config=configs/<divergence>.py[:preset] --workdir=DIR.

The experiment stages (prepare models, build data, evaluate, distil, evaluate, report) land with
the experiments issue; until then this entry point only says so.
"""

import sys


def main() -> int:
    print("not yet: the experiment stages of main.py are not implemented in this revision "
          f"(args: {' '.join(sys.argv[1:])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
