"""fcmae-convert: convert ConvNeXt V2 checkpoints between ours, timm, Hugging Face and the reference code.

    python -m tools.convert INPUT OUTPUT --to {ours,timm,hf,reference} [--model convnextv2_atto] [--ema]

The input layout is detected (our pretrain / fine-tune checkpoints, the reference MinkowskiEngine
pretraining or dense released layout, timm .pth / .safetensors, a Hugging Face ConvNextV2 directory) and
the variant inferred from its shapes; `--model` checks it (or names it when it cannot be inferred).
A bad input prints `error: <one line>` to stderr and exits with status 2.
"""
import argparse
import os
import sys

from safetensors import SafetensorError

from fcmae.cli import check_writable_dir
from fcmae.config import UsageError
from models.convert import TARGETS, CheckpointError, read_checkpoint, save_converted, to_canonical


TARGET_HELP = """targets:
  ours       fcmae-pretrain checkpoint (FCMAE.state_dict()) when the input has a decoder, else fcmae-finetune
  timm       timm state dict, safetensors when OUTPUT ends in .safetensors (else torch.save); no decoder
  hf         Hugging Face ConvNextV2 directory (config.json + model.safetensors); no decoder
  reference  reference MinkowskiEngine pretraining layout when the input has a decoder, else the dense
             released layout (with norm/head when the input has a head)"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fcmae-convert", description=__doc__.split("\n\n")[0], epilog=TARGET_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="checkpoint file (.pth/.pt/.safetensors) or Hugging Face directory")
    p.add_argument("output", help="output file (a directory for --to hf)")
    p.add_argument("--to", required=True, choices=TARGETS, help="target layout")
    p.add_argument("--model", default=None, help="variant, e.g. convnextv2_atto; checked against the weights")
    p.add_argument("--ema", action="store_true", help="convert the model_ema weights of a fine-tune checkpoint")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # where the output goes is checked first: a long conversion should not end in "cannot write"
        check_writable_dir(os.path.dirname(os.path.abspath(args.output)))
        name, layout, state = to_canonical(read_checkpoint(args.input), args.model, args.ema)
        written = save_converted(name, state, args.to, args.output)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (UsageError, OSError, SafetensorError) as e:
        print(f"error: cannot write {args.output}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 2
    print(f"{args.input} ({layout}, {name}) -> {args.output} ({written})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
