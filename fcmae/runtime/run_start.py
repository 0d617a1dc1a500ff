"""Where a run starts, decided before anything is written: a checkpoint to resume (by the --resume rules) or a
fresh start; the checkpoint's format and finiteness; the settings a resumed run must share; and the output
folder opened for the run (logging, --overwrite's clean-up)."""
import logging
import os
import shutil
from dataclasses import dataclass, field, replace
from typing import FrozenSet, Mapping, Optional, Tuple

from . import checkpoints as ckpt
from .checkpoint_file import read_checkpoint
from .distributed import DistInfo
from .errors import UsageError
from .logs import setup_logging

log = logging.getLogger("fcmae")


@dataclass(frozen=True)
class StartRules:
    """A stage's rules for resuming: its checkpoint `format` tag, how an error names such a checkpoint (`what`),
    the settings a resumed run must share (`fixed`: they shape the model) and those free to change (`run_only`:
    how or how far to run, not what is computed); any other changed setting is named in a warning. `defaults`:
    each option's value when not given; an option a checkpoint does not record (added since it was saved) changes
    nothing at its default, which keeps the behaviour the checkpoint's code had."""
    format: str
    what: str
    fixed: Tuple[str, ...]
    run_only: FrozenSet[str]
    defaults: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Start:
    """A checkpoint to resume (`path`, `state`) or a fresh start (both None); `warning` names settings that
    changed since the checkpoint (logged once the run's log is open)."""
    path: Optional[str] = None
    state: Optional[dict] = None
    warning: Optional[str] = None

    @property
    def resuming(self) -> bool:
        return self.state is not None


def find_start(output_dir: str, resume: str, overwrite: bool, rules: StartRules) -> Start:
    """The checkpoint to resume, or a fresh start, by the --resume rules: 'auto' takes the newest loadable
    checkpoint in output_dir; a path that one; 'none' starts anew. A fresh start (or an explicit path from
    elsewhere) never shares a folder with another run's checkpoints: that is an error unless --overwrite, which
    deletes them when the run starts (`open_output`)."""
    existing = ckpt.list_checkpoints(output_dir) if os.path.isdir(output_dir) else []
    if resume == "auto":
        path, state = ckpt.latest_loadable(output_dir) if existing else (None, None)
        existing = ckpt.list_checkpoints(output_dir) if existing else []  # unreadable ones were set aside
        if state is not None and overwrite:
            return Start()
    elif resume == "none":
        path, state = None, None
    else:
        path, state = resume, read_checkpoint(resume)
    if state is not None:
        check_format(state, path, rules)
        ckpt.check_finite_or_refuse(state, path, output_dir)
    same_dir = path is not None and os.path.dirname(os.path.abspath(path)) == os.path.abspath(output_dir)
    if existing and not same_dir and not overwrite:
        how = "resume it with --resume auto, " if resume == "none" else ""
        raise UsageError(f"{output_dir} holds checkpoints of another run (newest: {os.path.basename(existing[0])}); "
                         f"{how}choose a new --output-dir, or pass --overwrite to delete them and start anew")
    return Start(path, state)


def check_format(state, path: str, rules: StartRules):
    if not isinstance(state, dict) or state.get("format") != rules.format:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise UsageError(f"{path} is not {rules.what} (format {found!r})")
    for key in ("model", "optimizer", "scaler", "step", "args", "rng"):
        if key not in state:
            raise UsageError(f"{path} says format {rules.format!r} but has no {key!r}: a broken or foreign checkpoint")


def check_same_settings(start: Start, now: dict, rules: StartRules) -> Start:
    """A resumed run must share the `fixed` settings; others that differ (but `run_only`) are named in the
    returned Start's warning (the run will not match an uninterrupted one). A fresh start passes unchanged."""
    if not start.resuming:
        return start
    saved = start.state["args"]
    wrong = [k for k in rules.fixed if saved.get(k, now.get(k)) != now.get(k)]
    if wrong:
        raise UsageError(f"{start.path} was trained with " + ", ".join(f"--{k.replace('_', '-')} {_show(saved.get(k))}"
                         for k in wrong) + " but this run has " + ", ".join(f"{_show(now.get(k))}" for k in wrong)
                         + "; pass the same values to resume it (or a new --output-dir)")
    recorded = {**rules.defaults, **saved}  # an option the checkpoint predates ran as its default does
    changed = sorted(k for k in (set(saved) | set(now)) - rules.run_only - set(rules.fixed)
                     if recorded.get(k) != now.get(k))
    if not changed:
        return start
    return replace(start, warning="resuming with changed settings (the run will not match an uninterrupted one): "
                   + ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in changed))


def _show(v):
    return " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def open_output(output_dir: str, dist_info: DistInfo, start: Start, overwrite: bool):
    """Create the output folder and the run's log; log the start's warning; with --overwrite and a fresh start,
    remove another run's checkpoints and outputs."""
    os.makedirs(output_dir, exist_ok=True)
    setup_logging(output_dir, dist_info.is_main)
    if start.warning:
        log.warning(start.warning)
    if overwrite and not start.resuming and dist_info.is_main:
        for path in ckpt.list_checkpoints(output_dir) + [os.path.join(output_dir, n) for n in
                                                         ("checkpoint-best.pth", "metrics.json", "summary.csv")]:
            if os.path.exists(path):
                os.remove(path)
        shutil.rmtree(os.path.join(output_dir, "tensorboard"), ignore_errors=True)
