"""Pieces shared by the command-line entry points: logging, errors as one line + exit code 2, output dir checks."""
import logging
import os
import sys

from .config import UsageError
from .data import DataError


def setup_logging(output_dir=None, main_process: bool = True):
    handlers = [logging.StreamHandler(sys.stdout)]
    if output_dir and main_process:
        handlers.append(logging.FileHandler(os.path.join(output_dir, "log.txt")))
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING, handlers=handlers, force=True,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")


def check_writable_dir(path: str):
    """The output dir must exist and be writable, or be creatable; checked without creating anything."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UsageError(f"output dir {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"output dir {path} is not writable")


def run_cli(main_fn, argv=None) -> int:
    """Run `main_fn(argv)`; bad input becomes `error: <message>` on stderr and exit code 2, with no traceback."""
    from models.convert import CheckpointError

    try:
        main_fn(argv)
    except (UsageError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
