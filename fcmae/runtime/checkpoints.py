"""Training-state checkpoints: writing, keeping the newest few, and finding the newest one that loads.

Files are `checkpoint-<step>.pth` in the output dir; the newest `keep` are kept (a fresh run never shares its
folder with another run's checkpoints, fcmae.runtime.run_start.find_start, so these are the run's own). Checkpoints
are written atomically (fcmae.runtime.files), so a kill or a full disk never leaves a half-written checkpoint under
a real name and the previous one stays valid. A write that fails (full
disk, quota, lost mount; torch's zip writer reports ENOSPC as a RuntimeError) stops the run with exit code 4
and a message naming the checkpoint that is still good. Unreadable checkpoints found by auto-resume are renamed
`*.unreadable`, so they neither hide the good ones nor take a keep-k slot.
"""
import glob
import logging
import os
import random
import re

import numpy as np
import torch

from .checkpoint_file import read_checkpoint
from .errors import EXIT_WRITE_FAILED, CheckpointError, RunStopped
from .files import atomic_write, write_text

log = logging.getLogger(__name__)
CKPT_RE = re.compile(r"checkpoint-(\d+)\.pth$")


def checkpoint_step(path: str):
    """The step in a `checkpoint-<step>.pth` name; None for other names (checkpoint-best.pth, temporaries)."""
    m = CKPT_RE.search(os.path.basename(path))
    return int(m.group(1)) if m else None


def list_checkpoints(output_dir: str):
    """Checkpoint paths in the dir, newest step first."""
    found = [(checkpoint_step(p), p) for p in glob.glob(os.path.join(output_dir, "checkpoint-*.pth"))]
    return [p for step, p in sorted((f for f in found if f[0] is not None), reverse=True)]


def latest_loadable(output_dir: str):
    """(path, state) of the newest checkpoint that loads; broken newer ones are reported and set aside."""
    for path in list_checkpoints(output_dir):
        try:
            return path, read_checkpoint(path)  # never runs code from the file
        except CheckpointError as e:  # truncated, corrupt or not a checkpoint: fall back to the previous one
            log.warning("skipping unreadable checkpoint (renamed %s.unreadable): %s", os.path.basename(path), e)
            try:
                os.replace(path, path + ".unreadable")
            except OSError:
                pass
    return None, None


def _finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if torch.is_tensor(t) and t.is_floating_point())


def check_finite_or_refuse(state: dict, path: str, output_dir: str):
    """Refuse to resume weights that are not finite, naming the newest checkpoint whose weights are."""
    if _finite(state["model"].values()):
        return
    finite = None
    for other in list_checkpoints(output_dir):
        if os.path.abspath(other) == os.path.abspath(path):
            continue
        try:
            candidate = read_checkpoint(other)
        except CheckpointError:
            continue
        if isinstance(candidate, dict) and isinstance(candidate.get("model"), dict) and _finite(candidate["model"].values()):
            finite = other
            break
    hint = f"resume {finite} with --resume {finite}" if finite else "no checkpoint with finite weights was found"
    raise CheckpointError(f"{path} holds non-finite weights (NaN or inf), so resuming it would fail again; {hint}, "
                          "or start anew in a new --output-dir")


def save_training_state(output_dir: str, step: int, state: dict, keep: int = 2) -> str:
    path = os.path.join(output_dir, f"checkpoint-{step:08d}.pth")
    save_or_stop(state, path)
    for old in list_checkpoints(output_dir)[keep:]:
        os.remove(old)
    return path


def intact_message(output_dir: str, exclude: str = None) -> str:
    previous = [p for p in list_checkpoints(output_dir or ".") if p != exclude]
    return f"the previous checkpoint {previous[0]} is intact" if previous else "no earlier checkpoint exists"


def _reason(e: BaseException) -> str:
    text = getattr(e, "strerror", None) or " ".join(str(e).split())
    if "unexpected pos" in text or "file write failed" in text:  # torch's zip writer on ENOSPC
        text = f"the write failed ({text[:120]}), most likely a full disk"
    return text


def save_or_stop(state: dict, path: str):
    """An atomic torch.save, or stop the run with a message naming the newest checkpoint that is still valid."""
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except (OSError, RuntimeError) as e:
        raise RunStopped(f"could not write checkpoint {path}: {_reason(e)}; "
                         f"{intact_message(os.path.dirname(path), exclude=path)}. Free space (or fix the output dir) "
                         "and rerun the same command to resume", EXIT_WRITE_FAILED) from None


def write_text_or_stop(path: str, text: str):
    """A small file (config.yaml, metrics.json, summary.csv) written atomically; a failure stops with exit code 4."""
    try:
        write_text(path, text)
    except OSError as e:
        raise RunStopped(f"could not write {path}: {_reason(e)}; {intact_message(os.path.dirname(path))}. Free space "
                         "(or fix the output dir) and rerun the same command to resume", EXIT_WRITE_FAILED) from None


def rng_state() -> dict:
    """RNG states of torch, numpy and python, in weights_only-loadable form."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
