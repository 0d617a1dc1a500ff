"""Options of `python -m finetune`, declared once (fcmae.config), and their checks before any work starts.

Defaults are the reference convnextv2_atto recipe; configs/finetune/<model>.yaml hold the other variants'.
"""
import argparse
import os

import torch

from fcmae.cli import check_writable_dir
from fcmae.config import (ArgParser, UsageError, add, add_bad_image_options, add_skip_nonfinite, add_speed_options,
                          check_bad_image_options, input_size, parse_with_config)
from finetune.layer_decay import LAYER_DECAY_TYPES
from models import VARIANTS
from models.variants import get_variant

DEFAULT_MODEL = "convnextv2_atto"

# --linear-probe: the encoder is frozen, so what regularises fine-tuning (layer decay, mixup/cutmix, RandAugment,
# random erasing, drop-path, label smoothing, weight decay, EMA) is off; AdamW on the LayerNorm + Linear head at
# blr 4e-2, i.e. lr 1e-2 at an effective batch of 64 (a 3-epoch probe on Fashion-MNIST reached 65% top-1 with it,
# 54% with lr 2.5e-4). They override a -c config's values, not explicit flags.
PROBE_DEFAULTS = {"layer_decay": 1.0, "mixup": 0.0, "cutmix": 0.0, "aa": "none", "reprob": 0.0, "drop_path": 0.0,
                  "smoothing": 0.0, "weight_decay": 0.0, "model_ema": False, "blr": 4e-2}


def build_parser() -> ArgParser:
    p = ArgParser(prog="python -m finetune",
                  description="Fine-tune (or evaluate) a ConvNeXt V2 classifier, optionally from an FCMAE checkpoint. "
                              "Defaults: the reference convnextv2_atto recipe; "
                              "-c configs/finetune/<model>.yaml for the others.")
    add(p, "-c", "--config", default=None, help="YAML file of option defaults (e.g. configs/finetune/<model>.yaml)")
    g = p.add_argument_group("model")
    add(g, "--model", default=None,
        help=f"one of: {', '.join(VARIANTS)}; default: the --finetune/--resume checkpoint's, else {DEFAULT_MODEL}")
    add(g, "--finetune", default=None,
        help="initialise from this checkpoint (FCMAE pretraining, ours, timm, reference or Hugging Face); "
             "the decoder is dropped and the head re-initialised unless --keep-head")
    add(g, "--keep-head", action="store_true", help="keep the checkpoint's classifier head (same number of classes)")
    add(g, "--linear-probe", action="store_true",
        help="train only the head (LayerNorm + Linear on pooled features) on the frozen encoder, run in eval mode; "
             "defaults then: " + ", ".join(f"{k}={v}" for k, v in PROBE_DEFAULTS.items())
             + " (flags given on the command line win)")
    add(g, "--nb-classes", type=int, default=None,
        help="classifier outputs; default: the kept head's size, else the number of classes in the data")
    add(g, "--input-size", type=int, nargs="+", default=[224], help="224 (square) or 'H W'")
    add(g, "--drop-path", type=float, default=0.1, help="stochastic depth rate")
    g = p.add_argument_group("data")
    add(g, "--dataset", default="fashion-mnist", choices=["fashion-mnist"],
        help="built-in dataset, used when --data-path is not given (grey images served as RGB)")
    add(g, "--data-path", default=None, help="folder with train/<class>/* and val/<class>/* images")
    add(g, "--train-subset", type=int, default=None, help="train on a seeded, class-stratified subset of N images")
    add(g, "--label-fraction", type=float, default=None,
        help="train on a seeded, class-stratified fraction of the labelled images (e.g. 0.01, 0.1)")
    add(g, "--val-subset", type=int, default=None, help="evaluate on a seeded, class-stratified subset of N images")
    add(g, "--num-workers", type=int, default=2)
    add_bad_image_options(g)
    add(g, "--aa", default="rand-m9-mstd0.5-inc1", help="timm auto-augment policy, or 'none'")
    add(g, "--reprob", type=float, default=0.25, help="random erasing probability")
    add(g, "--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
    add(g, "--cutmix", type=float, default=0.0, help="cutmix alpha (0: off)")
    add(g, "--smoothing", type=float, default=0.2, help="label smoothing")
    g = p.add_argument_group("optimisation")
    add(g, "--batch-size", type=int, default=64, help="images per process per micro-batch")
    add(g, "--accum-iter", type=int, default=1, help="micro-batches per optimiser step")
    add(g, "--epochs", type=int, default=600)
    add(g, "--max-steps", type=int, default=None, help="stop after this many optimiser steps (smoke runs)")
    add(g, "--warmup-epochs", type=float, default=0)
    add(g, "--blr", type=float, default=2e-4, help="base lr: lr = blr * effective batch / 256")
    add(g, "--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    add(g, "--min-lr", type=float, default=1e-6)
    add(g, "--weight-decay", type=float, default=0.3)
    add(g, "--layer-decay", type=float, default=0.9, help="lr scale ratio between consecutive layers (1: off)")
    add(g, "--layer-decay-type", default="single", choices=list(LAYER_DECAY_TYPES),
        help="'single': one id per block; 'group': 12 groups of three blocks (base and up)")
    add(g, "--clip-grad", type=float, default=None)
    add(g, "--amp", default="none", choices=["none", "bf16", "fp16"], help="autocast precision (loss stays float32)")
    add_speed_options(g)
    add_skip_nonfinite(g)
    add(g, "--model-ema", action=argparse.BooleanOptionalAction, default=True, help="keep an EMA of the weights")
    add(g, "--model-ema-decay", type=float, default=0.9999)
    add(g, "--model-ema-eval", action=argparse.BooleanOptionalAction, default=True,
        help="also evaluate the EMA weights every epoch")
    g = p.add_argument_group("run")
    add(g, "--eval", action="store_true",
        help="evaluate and exit: the --resume CKPT if given, else the --finetune one (with its head), else the "
             "newest checkpoint in --output-dir")
    add(g, "--output-dir", default="output/finetune")
    add(g, "--resume", default="auto", help="'auto' (newest loadable checkpoint in --output-dir), a path, or 'none'")
    add(g, "--save-every-steps", type=int, default=None, help="also checkpoint every N steps (mid-epoch)")
    add(g, "--keep-checkpoints", type=int, default=2)
    add(g, "--log-every", type=int, default=20, help="progress line every N steps")
    add(g, "--eval-every-epochs", type=int, default=1,
        help="evaluate (and pick the best checkpoint) every N epochs; always at the end")
    add(g, "--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add(g, "--seed", type=int, default=0)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Option values: parser defaults < -c config < probe defaults (with --linear-probe) < the command line."""
    parser = build_parser()
    args = parse_with_config(parser, argv)  # leaves the config's values on the parser as its defaults
    if args.linear_probe:
        parser.set_defaults(**PROBE_DEFAULTS)
        args = parser.parse_args(argv)
    return args


def probe_settings(args) -> str:
    """The settings a linear probe runs with, for the log."""
    return ", ".join(f"{k}={getattr(args, k)}" for k in PROBE_DEFAULTS if k != "blr") + \
        (f", lr={args.lr}" if args.lr is not None else f", blr={args.blr}")


def _positive(args, *names):
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def validate(args):
    """Every check that can fail on user input without reading data or checkpoints, before anything is written."""
    try:
        if args.model is not None:
            args.model = get_variant(args.model).name
        args.input_size = input_size(args.input_size)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if min(args.input_size) < 32:
        raise UsageError(f"--input-size must be at least 32 (the network's total stride), got {args.input_size}")
    _positive(args, "batch_size", "accum_iter", "epochs", "max_steps", "nb_classes", "train_subset", "val_subset",
              "keep_checkpoints", "log_every", "save_every_steps", "eval_every_epochs")
    check_bad_image_options(args)
    if args.skip_nonfinite < 0:
        raise UsageError(f"--skip-nonfinite must be >= 0, got {args.skip_nonfinite}")
    if args.train_subset is not None and args.label_fraction is not None:
        raise UsageError("give --train-subset or --label-fraction, not both")
    if args.label_fraction is not None and not 0 < args.label_fraction <= 1:
        raise UsageError(f"--label-fraction must be in (0, 1], got {args.label_fraction}")
    for name in ["warmup_epochs", "min_lr", "weight_decay", "drop_path", "smoothing", "mixup", "cutmix", "reprob"]:
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0 < args.layer_decay:
        raise UsageError(f"--layer-decay must be > 0, got {args.layer_decay}")
    if not 0 <= args.model_ema_decay < 1:
        raise UsageError(f"--model-ema-decay must be in [0, 1), got {args.model_ema_decay}")
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        raise UsageError(f"mixup/cutmix pair images within a batch: --batch-size must be even, got {args.batch_size}")
    if args.aa in ("none", ""):
        args.aa = None
    if args.finetune is not None and not os.path.exists(args.finetune):
        raise UsageError(f"--finetune checkpoint not found: {args.finetune}")
    if args.resume not in ("auto", "none") and not os.path.isfile(args.resume):
        raise UsageError(f"--resume checkpoint not found: {args.resume}")
    if args.eval and args.finetune is None and args.resume == "none":
        raise UsageError("--eval needs a checkpoint: --finetune CKPT or --resume CKPT (or 'auto' with --output-dir)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device} requested but CUDA is not available; use --device cpu")
    if not args.eval:  # evaluation writes nothing
        check_writable_dir(args.output_dir)
