"""Reading checkpoint files without running code from them: `torch.load(weights_only=True)` with a short list of
inert globals, safetensors, or a Hugging Face model directory (config.json + weights). Used by the converter and
the training runtime alike; any problem is a one-line CheckpointError."""
import argparse
import json
import os
import pathlib
import pickle
import re

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors

from .errors import CheckpointError

HF_WEIGHTS = "model.safetensors"

# Globals that checkpoints written by training scripts contain besides tensors, all inert:
# argparse.Namespace (the reference code saves `args`), paths inside it, numpy arrays and scalars
# (numpy RNG state). Whatever they hold still goes through the same restricted unpickler.
_NP_CORE = getattr(np, "_core", None) or np.core
_NP_DTYPES = [getattr(np.dtypes, n) for n in getattr(getattr(np, "dtypes", None), "__all__", [])]
_SAFE_GLOBALS = [argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath, np.ndarray, np.dtype,
                 _NP_CORE.multiarray._reconstruct, _NP_CORE.multiarray.scalar, *_NP_DTYPES]


def read_checkpoint(path) -> dict:
    """Load a `.pth`/`.pt`/`.safetensors` file or a Hugging Face directory without running any code.

    Returns the raw container (e.g. `{"format": ..., "model": {...}}`, the reference `{"model": ...}`)
    or a plain state dict; a Hugging Face directory gives `{"hf_config": config, "model": state_dict}`."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return _read_hf_dir(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: not a regular file")
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
    # A safetensors file starts with an 8-byte little-endian header length, then the JSON header.
    if path.endswith(".safetensors") or head[8:9] == b"{":
        return _read_safetensors(path)
    return _torch_load(path)


def _read_safetensors(path) -> dict:
    try:
        return load_safetensors(path, device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file, or truncated ({_one_line(e)})") from None


def _torch_load(path):
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        blocked = re.search(r"GLOBAL ([\w.]+)", str(e))
        if blocked:
            raise CheckpointError(
                f"{path}: refused to load: it would unpickle {blocked.group(1)}, which could run code "
                "(only tensors and plain containers are loaded, weights_only=True)") from None
        raise CheckpointError(f"{path}: not a PyTorch checkpoint, or corrupt ({_weights_only_reason(e)})") from None
    except Exception as e:  # anything torch.load trips on means the file is not a readable checkpoint
        raise CheckpointError(f"{path}: not a PyTorch checkpoint, or truncated ({_one_line(e)})") from None


def _weights_only_reason(e) -> str:
    found = re.search(r"(Unsupported operand \d+|Can only build .* but got <class '[\w.]+'>|Unsupported [\w ]+)", str(e))
    return found.group(1) if found else _one_line(e)


def _one_line(e, limit=160) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _read_hf_dir(path) -> dict:
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{path}: directory has no config.json, so it is not a Hugging Face model directory")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({_one_line(e)})") from None
    if not isinstance(config, dict) or config.get("model_type") != "convnextv2":
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise CheckpointError(f"{config_path}: model_type is {kind!r}, expected 'convnextv2'")
    weights = os.path.join(path, HF_WEIGHTS)
    if os.path.isfile(weights):
        sd = _read_safetensors(weights)
    elif os.path.isfile(os.path.join(path, "pytorch_model.bin")):
        sd = _torch_load(os.path.join(path, "pytorch_model.bin"))
    else:
        raise CheckpointError(f"{path}: Hugging Face directory has no {HF_WEIGHTS} (sharded weights are not supported)")
    return {"hf_config": config, "model": sd}
