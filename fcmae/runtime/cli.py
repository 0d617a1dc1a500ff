"""What every command-line entry point shares: errors as one line + exit code, output location checks.

Exit codes are defined in fcmae/runtime/errors.py.
"""
import os
import sys
import tempfile

from .errors import BAD_INPUT, EXIT_INTERRUPTED, EXIT_USAGE, RunStopped, UsageError
from .logs import report_error


def check_writable_dir(path: str):
    """The output dir must exist and be writable, or be creatable; checked without creating anything."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UsageError(f"output dir {path}: {probe} is a file, not a folder")
    try:  # a real write (removed at once): permission bits alone say nothing for root or read-only mounts
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise UsageError(f"output dir {path} is not writable ({e.strerror})") from None


def check_output_file(path: str, what: str = "output"):
    """A file to be written at the end (e.g. --json): its folder must be writable now, before any work."""
    if os.path.isdir(path):
        raise UsageError(f"{what} {path} is a folder, not a file")
    try:
        check_writable_dir(os.path.dirname(os.path.abspath(path)))
    except UsageError as e:  # the message names the option, not only a folder
        raise UsageError(f"cannot write {what} {path}: {e}") from None


def run_cli(main_fn, argv=None) -> int:
    """Run `main_fn(argv)`; bad input (also data that turns out bad mid-run) becomes `error: <message>` and exit
    code 2, a stopped run its own code, Ctrl-C before training starts exit 130; never a traceback for these."""
    try:
        main_fn(argv)
    except BAD_INPUT as e:
        report_error(str(e))
        return EXIT_USAGE
    except RunStopped as e:
        report_error(str(e))
        return e.exit_code
    except KeyboardInterrupt:
        report_error("interrupted (Ctrl-C) before training started; nothing was written")
        return EXIT_INTERRUPTED
    return 0


def exit_with(main_fn, argv=None):
    sys.exit(run_cli(main_fn, argv))
