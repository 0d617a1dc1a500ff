"""Errors that end a command, and every exit code. A leaf: imports nothing of the project, so every module above
models can raise them and every command-line entry point maps them to an exit code (fcmae.runtime.cli).

Exit codes: 0 finished; 2 bad input (arguments, data, checkpoints); 3 non-finite loss, gradient or weights;
4 a checkpoint, config or log could not be written (the previous checkpoint stays valid); 75 stopped by a
signal (SIGTERM, SIGINT, SIGUSR1) after saving: rerun the same command to resume (EX_TEMPFAIL, so a requeue
loop can tell a preempted run from a finished one); 130 interrupted (Ctrl-C) during start-up, nothing written.
"""

EXIT_USAGE = 2
EXIT_NONFINITE = 3
EXIT_WRITE_FAILED = 4
EXIT_STOPPED = 75
EXIT_INTERRUPTED = 130


class UsageError(ValueError):
    """A bad invocation: reported as one line and exit code 2, before anything is written."""


class DataError(ValueError):
    """Bad data location or contents: one line, exit code 2."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit: the message is one line naming the problem."""


class RunStopped(RuntimeError):
    """A run that cannot go on (or was asked to stop): one-line message, its own exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


BAD_INPUT = (UsageError, DataError, CheckpointError)
