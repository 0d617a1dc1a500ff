"""fcmae-convert: convert ConvNeXt V2 checkpoints between ours, timm, Hugging Face and the reference code.

    python -m fcmae.tools.convert INPUT OUTPUT --to {ours,timm,hf,reference} [--model convnextv2_atto] [--ema]
                            [--in-chans C] [--overwrite]

The input layout is detected (our pretrain / fine-tune checkpoints, the reference MinkowskiEngine
pretraining or dense released layout, timm .pth / .safetensors, a Hugging Face ConvNextV2 directory) and
the variant inferred from its shapes; `--model` checks it (or names it when it cannot be inferred).
Any number of input channels travels through every layout; `--in-chans C` adapts an RGB checkpoint to C
channels (timm's rule for the stem; see models.convert.adapt_in_chans for the decoder), a no-op when the
checkpoint already has C channels. An existing OUTPUT is refused unless `--overwrite` is given (checked
before the input is read). A bad input prints `error: <one line>` to stderr and exits with status 2.
"""
import json
import os
import sys

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file as save_safetensors

from fcmae.runtime.checkpoint_file import HF_WEIGHTS, read_checkpoint
from fcmae.runtime.cli import check_writable_dir
from fcmae.runtime.errors import CheckpointError, UsageError
from fcmae.runtime.options import ArgParser, Int, Str, add, parse_with_config
from fcmae.runtime.weights import checkpoint_errors
from models.convert import (FINETUNE_FORMAT, PRETRAIN_FORMAT, TARGETS, adapt_in_chans, from_canonical, has_decoder,
                            in_chans_of, to_canonical)

TARGET_HELP = """targets:
  ours       fcmae-pretrain checkpoint (FCMAE.state_dict()) when the input has a decoder, else fcmae-finetune
  timm       timm state dict, safetensors when OUTPUT ends in .safetensors (else torch.save); no decoder
  hf         Hugging Face ConvNextV2 directory (config.json + model.safetensors); no decoder
  reference  reference MinkowskiEngine pretraining layout when the input has a decoder, else the dense
             released layout (with norm/head when the input has a head)

--in-chans C on an RGB checkpoint: the stem conv as timm adapts pretrained weights (C = 1 sums the RGB
filters; C > 1 repeats R, G, B, R, ... scaled by 3 / C); the decoder's pred: channel c takes RGB channel
c % 3's outputs (C = 1: their mean). The checkpoint's own C changes nothing; a checkpoint with other than
3 channels cannot be adapted to another C (an error)."""

# Weight files a Hugging Face directory may hold besides ours: left there they would be mixed with the new weights.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".index.json")


def build_parser() -> ArgParser:
    p = ArgParser(prog="fcmae-convert", description=__doc__.split("\n\n")[0], epilog=TARGET_HELP)
    p.add_argument("input", help="checkpoint file (.pth/.pt/.safetensors) or Hugging Face directory")
    p.add_argument("output", help="output file (a directory for --to hf)")
    add(p, "--to", kind=Str(list(TARGETS)), required=True, help="target layout: " + ", ".join(TARGETS))
    add(p, "--model", kind=Str(optional=True), default=None,
        help="variant, e.g. convnextv2_atto; checked against the weights")
    add(p, "--ema", action="store_true", help="convert the model_ema weights of a fine-tune checkpoint")
    add(p, "--in-chans", kind=Int(min=1, max=64), default=None, metavar="C",
        help="adapt an RGB checkpoint to C input channels (a no-op when it already has C)")
    add(p, "--overwrite", action="store_true",
        help="replace an existing OUTPUT (for --to hf: its config.json and model.safetensors)")
    return p


def check_output(output: str, to: str, overwrite: bool):
    """Before anything is read: the output's folder is writable, and an existing output is replaced only with
    overwrite. A Hugging Face directory holding other weight files is refused even then (they would be mixed
    with the new ones); an empty existing directory is fine."""
    _check_writable(output, os.path.dirname(os.path.abspath(output)))
    if not os.path.lexists(output):
        return
    if to != "hf":
        if os.path.isdir(output):
            raise UsageError(f"{output} is a directory; --to {to} writes a file")
        if not overwrite:
            raise UsageError(f"{output} already exists; pass --overwrite to replace it")
        return
    if not os.path.isdir(output):
        raise UsageError(f"{output} exists and is not a directory (--to hf writes a directory)")
    entries = sorted(os.listdir(output))
    if entries and not overwrite:
        raise UsageError(f"{output} already exists and is not empty; pass --overwrite to replace its config.json "
                         f"and {HF_WEIGHTS}")
    others = [e for e in entries if e.endswith(_WEIGHT_SUFFIXES) and e != HF_WEIGHTS]
    if others:
        raise UsageError(f"{output} holds other weight files ({', '.join(others)}) that would be mixed with the new "
                         "ones; remove them or choose another directory")
    _check_writable(output, output)


def _check_writable(output: str, folder: str):
    try:
        check_writable_dir(folder)
    except UsageError as e:
        raise UsageError(f"cannot write {output}: {e}") from None


def save_converted(model_name: str, state, to: str, output) -> str:
    """Write the canonical state dict as `to` at `output`; returns a short description of what was written.

    ours -> torch.save of {"format", "model_name", "model"}; timm -> safetensors when `output` ends in
    .safetensors, else torch.save; hf -> a directory with config.json + model.safetensors;
    reference -> torch.save({"model": ...}) like the reference code's checkpoints."""
    output = os.fspath(output)
    result = from_canonical(model_name, state, to)
    if to == "hf":
        config, sd = result
        os.makedirs(output, exist_ok=True)
        with open(os.path.join(output, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        save_safetensors(sd, os.path.join(output, HF_WEIGHTS), metadata={"format": "pt"})
        return f"{config['architectures'][0]} directory"
    if to == "ours":
        fmt = PRETRAIN_FORMAT if has_decoder(state) else FINETUNE_FORMAT
        torch.save({"format": fmt, "model_name": model_name, "model": result}, output)
        return fmt
    if to == "timm" and output.endswith(".safetensors"):
        save_safetensors(result, output, metadata={"format": "pt"})
        return "timm safetensors"
    if to == "timm":
        torch.save(result, output)
        return "timm state dict"
    torch.save({"model": result}, output)
    return "reference MinkowskiEngine pretraining layout" if has_decoder(state) else "reference dense layout"


def main(argv=None) -> int:
    try:
        args = parse_with_config(build_parser(), argv)
        # where the output goes is checked first: a long conversion should not end in "cannot write"
        check_output(args.output, args.to, args.overwrite)
        obj = read_checkpoint(args.input)
        with checkpoint_errors():
            name, layout, state = to_canonical(obj, args.model, args.ema)
            channels = in_chans_of(state)
            if args.in_chans is not None:
                state = adapt_in_chans(state, args.in_chans)
            written = save_converted(name, state, args.to, args.output)
    except (CheckpointError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, SafetensorError) as e:
        print(f"error: cannot write {args.output}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 2
    adapted = f", input channels {channels} -> {args.in_chans}" if args.in_chans not in (None, channels) else ""
    print(f"{args.input} ({layout}, {name}, in_chans {channels}) -> {args.output} ({written}{adapted})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
