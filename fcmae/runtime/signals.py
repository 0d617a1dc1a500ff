"""Stop requests: SIGTERM, SIGINT and SIGUSR1 (SLURM's --signal=USR1@120) during a run finish the current step, save
and exit with EXIT_STOPPED. Under DDP every process must stop at the same step (a process that leaves while the
others enter the next all-reduce would hang them), so the processes agree at each log interval. DataLoader worker
processes ignore these signals (`ignore_stop_signals`): a signal sent to a whole process group (torchrun passing
SIGTERM on to its workers, SLURM's scancel, Ctrl-C in a terminal) reaches them too, and a worker it ended would
fail the training process ("DataLoader worker ... is killed by signal") before it could save."""
import signal

import torch

from .distributed import DistInfo


class StopRequest:
    """Catches the stop signals while the run is inside `with StopRequest() as stop:`; `stop.signal` is the name
    of the one received (None until then). The previous handlers come back when the run ends."""

    SIGNALS = [s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None)) if s is not None]

    def __init__(self):
        self.signal = None
        self.previous = {}

    def __enter__(self):
        for s in self.SIGNALS:
            self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name


def stop_agreed(stop: StopRequest, dist_info: DistInfo, device: torch.device, at_log_interval: bool,
                agreed: bool) -> bool:
    """Whether to stop after this step: the signal itself in one process; under DDP the OR over processes, taken
    at log intervals only (`agreed` is the previous decision, kept in between: one all-reduce per interval)."""
    if not dist_info.enabled:
        return stop.signal is not None
    if not at_log_interval:
        return agreed
    flag = torch.tensor([1.0 if stop.signal else 0.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def ignore_stop_signals(worker_id: int):
    """DataLoader `worker_init_fn`: the stop signals are the training process's to handle. A worker still ends
    with the training process (torch's workers watch their parent)."""
    for s in StopRequest.SIGNALS:
        signal.signal(s, signal.SIG_IGN)
