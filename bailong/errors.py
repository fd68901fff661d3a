"""User-facing errors: one line, no traceback, non-zero exit."""
import sys


class BailongError(Exception):
    """A problem with the user's input (a path, a file, an option), not a bug.

    The message is one line that names the file and the problem; command-line
    entry points print it as ``error: ...`` and exit with status 1.
    """


def run_cli(main, argv=None):
    """Run ``main(argv)`` and turn user errors and Ctrl-C into a clean exit."""
    try:
        sys.exit(main(argv))
    except BailongError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
