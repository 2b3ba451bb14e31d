"""`python -m course_utils <command>`.

    doctor    check that this machine is ready for the course (--warm: also fill the SmolLM2 cache)
    prepare   convert SmolLM2 into its warm cache now (once, ~20 s)

A CourseError is printed as one line on stderr (exit status 2), no traceback.
"""

import argparse
import sys

from .errors import CourseError


def _doctor(args) -> int:
    from . import doctor

    return doctor.main(warm=args.warm)


def _prepare(args) -> int:
    from . import smollm2

    folder = smollm2.prepare(force=args.force)
    print(f"SmolLM2 is ready in {folder}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_utils", description="Helpers for the fine-tuning course.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    doctor = commands.add_parser("doctor", help="check that this machine is ready for the course")
    doctor.add_argument("--warm", action="store_true", help="first convert SmolLM2 into its cache if it is cold")
    doctor.set_defaults(run=_doctor)
    prepare = commands.add_parser("prepare", help="convert SmolLM2 into its warm cache now (once, ~20 s)")
    prepare.add_argument("--force", action="store_true", help="rebuild the cache even if it looks fine")
    prepare.set_defaults(run=_prepare)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except CourseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
