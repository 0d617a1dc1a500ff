"""Logging for a run: progress to stdout, warnings and errors to stderr, everything to `output_dir`/log.txt.

A log file that cannot be written (a full disk, a lost mount) must not print a traceback from the middle of
training nor be ignored: its handler records the failure and goes quiet, and the training loop stops the run
at its next check with exit code 4 (`log_write_failure`). File names that are not valid UTF-8 are written with
backslash escapes instead of failing.
"""
import logging
import os
import sys

log = logging.getLogger("fcmae")


class RunLogFile(logging.FileHandler):
    """log.txt: opened at the first record; the first failed write is kept in `failure` and later records dropped."""

    def __init__(self, path: str):
        super().__init__(path, encoding="utf-8", errors="backslashreplace", delay=True)
        self.failure = None

    def emit(self, record):
        if self.failure is None:
            super().emit(record)

    def handleError(self, record):
        self.failure = sys.exc_info()[1]
        try:  # closing flushes the buffer that just failed to write, so it fails again: still closed after
            self.close()
        except OSError:
            pass
        try:
            if os.path.exists(self.baseFilename) and os.path.getsize(self.baseFilename) == 0:
                os.remove(self.baseFilename)  # nothing but an empty file would stay behind
        except OSError:
            pass


def setup_logging(output_dir=None, main_process: bool = True):
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")  # undecodable file names are printed escaped
    out, err = logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err.setLevel(logging.WARNING)
    handlers = [out, err]
    if output_dir and main_process:
        handlers.append(RunLogFile(os.path.join(output_dir, "log.txt")))
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING, handlers=handlers, force=True,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")


def log_write_failure():
    """The exception of the run's log.txt writes, if one failed (else None)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, RunLogFile) and handler.failure is not None:
            return handler.failure
    return None


def report_error(message: str):
    """One `error: ...` line on stderr; in a running job also in log.txt, which should say why the run stopped."""
    print(f"error: {message}", file=sys.stderr)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, RunLogFile) and handler.failure is None:
            handler.emit(logging.LogRecord("fcmae", logging.ERROR, __file__, 0, f"error: {message}", None, None))
            handler.flush()
