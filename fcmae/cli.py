"""Pieces shared by the command-line entry points: logging, errors as one line + exit code, output dir checks.

Exit codes: 0 finished (or stopped by SIGTERM/SIGINT after saving), 2 bad input (arguments, data, checkpoints),
3 non-finite loss or gradient, 4 a checkpoint could not be written (the previous one stays valid).
"""
import logging
import os
import sys
import tempfile

from .errors import BAD_INPUT, EXIT_USAGE, RunStopped, UsageError


def setup_logging(output_dir=None, main_process: bool = True):
    """Progress to stdout, warnings and errors to stderr, everything to `output_dir`/log.txt."""
    out, err = logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err.setLevel(logging.WARNING)
    handlers = [out, err]
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
    try:  # a real write (removed at once): permission bits alone say nothing for root or read-only mounts
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise UsageError(f"output dir {path} is not writable ({e.strerror})") from None


def report_error(message: str):
    """One `error: ...` line on stderr; in a running job also in log.txt, which should say why the run stopped."""
    print(f"error: {message}", file=sys.stderr)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.emit(logging.LogRecord("fcmae", logging.ERROR, __file__, 0, f"error: {message}", None, None))


def run_cli(main_fn, argv=None) -> int:
    """Run `main_fn(argv)`; bad input (also data that turns out bad mid-run) becomes `error: <message>` and exit
    code 2, a stopped run its own code, with no traceback."""
    try:
        main_fn(argv)
    except BAD_INPUT as e:
        report_error(str(e))
        return EXIT_USAGE
    except RunStopped as e:
        report_error(str(e))
        return e.exit_code
    return 0
