"""Options of `python -m finetune`, each declared once with its type and range (fcmae.runtime.options), and their checks
before any work starts.

Defaults are the reference convnextv2_atto recipe; configs/finetune/<model>.yaml hold the other variants' (`-c NAME`).
Light to import (no torch, no timm): `python -m finetune --help` builds this parser before the training code loads.
START_RULES, which needs fcmae.runtime.run_start (torch), is made on first use.
"""
import argparse
import os

from fcmae.runtime.cli import check_writable_dir
from fcmae.runtime.errors import UsageError
from fcmae.runtime.options import (
    RUN_ONLY,
    ArgParser,
    Bool,
    Float,
    Int,
    Str,
    add,
    add_config_option,
    add_data_loading_options,
    add_model_input_options,
    add_optimisation_options,
    add_run_options,
    check_all,
    input_size,
    parse_with_config,
    shown,
)
from models.variants import USER_VARIANTS, get_variant

from .layer_decay import LAYER_DECAY_TYPES

DEFAULT_MODEL = "convnextv2_atto"
FORMAT = "fcmae-finetune"
EXAMPLES = """examples:
  # fine-tune an FCMAE checkpoint on train/<class>/ and val/<class>/ folders with the reference atto recipe
  python -m finetune --finetune output/pretrain/checkpoint-00001000.pth --data-path /data/labelled
  # the reference convnextv2_base recipe (AdamW, layer decay 0.6, mixup, cutmix, EMA) on 4 GPUs
  torchrun --nproc-per-node 4 -m finetune -c convnextv2_base --finetune base.pth --data-path /data/labelled \\
      --accum-iter 8
  # evaluate a fine-tuned checkpoint and exit
  python -m finetune --eval --resume output/finetune/checkpoint-best.pth --data-path /data/labelled
"""


def __getattr__(name):
    """START_RULES on first use: fcmae.runtime.run_start imports torch, which --help must not wait for."""
    if name != "START_RULES":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from fcmae.runtime.run_start import StartRules

    rules = StartRules(
        format=FORMAT, what="a fine-tuning checkpoint (start from it with --finetune instead)",
        fixed=("model", "in_chans", "nb_classes", "encoder_grn"),  # they shape the model
        run_only=RUN_ONLY | {"eval", "finetune", "eval_every_epochs"}, defaults=build_parser().defaults())
    globals()["START_RULES"] = rules
    return rules


# --linear-probe: the encoder is frozen, so what regularises fine-tuning (layer decay, mixup/cutmix, RandAugment,
# random erasing, drop-path, label smoothing, weight decay, EMA) is off; AdamW on the LayerNorm + Linear head at
# blr 4e-2, i.e. lr 1e-2 at an effective batch of 64 (a 3-epoch probe on Fashion-MNIST reached 65% top-1 with it,
# 54% with lr 2.5e-4). They override a -c config's values, not explicit flags.
PROBE_DEFAULTS = {"layer_decay": 1.0, "mixup": 0.0, "cutmix": 0.0, "aa": "none", "reprob": 0.0, "drop_path": 0.0,
                  "smoothing": 0.0, "weight_decay": 0.0, "model_ema": False, "blr": 4e-2}


def build_parser() -> ArgParser:
    p = ArgParser(prog="python -m finetune", recipes="finetune", epilog=EXAMPLES,
                  description="Fine-tune (or evaluate) a ConvNeXt V2 classifier, optionally from an FCMAE checkpoint\n"
                              "(defaults: the reference recipe of convnextv2_atto; -c NAME for the others).")
    add_config_option(p)
    g = p.add_argument_group("model")
    add(g, "--model", kind=Str(optional=True), default=None,
        help=f"one of: {', '.join(USER_VARIANTS)}; default: the --finetune/--resume checkpoint's, else {DEFAULT_MODEL}")
    add(g, "--finetune", kind=Str(optional=True), default=None,
        help="initialise from this checkpoint (FCMAE pretraining, ours, timm, reference or Hugging Face); "
             "the decoder is dropped and the classifier re-initialised unless --keep-head (a final norm is kept)")
    add(g, "--keep-head", action="store_true", help="keep the checkpoint's classifier head (same number of classes)")
    add(g, "--linear-probe", action="store_true",
        help="train only the head (LayerNorm + Linear on pooled features) on the frozen encoder, run in eval mode; "
             "defaults then: " + ", ".join(f"{k}={v}" for k, v in PROBE_DEFAULTS.items())
             + " (flags given on the command line win)")
    add(g, "--nb-classes", "--num-classes", kind=Int(min=1), default=None,
        help="classifier outputs; default: the kept head's size, else the number of classes in the data")
    add_model_input_options(g)
    add(g, "--drop-path", kind=Float(min=0, max=1, open_max=True), default=0.1, help="stochastic depth rate")
    add(g, "--encoder-grn", kind=Bool(), default=True,
        help="GRN in the blocks (--no-encoder-grn: the ConvNeXt V1-style ablation, GRN held at identity, as a "
             "checkpoint pretrained with --no-encoder-grn expects)")
    g = p.add_argument_group("data")
    add(g, "--dataset", kind=Str(["fashion-mnist"]), default="fashion-mnist",
        help="built-in dataset, used when --data-path is not given")
    add(g, "--data-path", "--data-dir", kind=Str(optional=True), default=None, metavar="PATH",
        help="folder with train/<class>/* and val/<class>/* images (or train/ and val/ tar shards)")
    add(g, "--train-subset", kind=Int(min=1), default=None, help="train on a seeded, class-stratified subset of N")
    add(g, "--label-fraction", kind=Float(min=0, max=1, open_min=True), default=None,
        help="train on a seeded, class-stratified fraction of the labelled images (e.g. 0.01, 0.1)")
    add(g, "--val-subset", kind=Int(min=1), default=None, help="evaluate on a seeded, class-stratified subset of N")
    add(g, "--val-split", kind=Int(min=1), default=None,
        help="hold out N class-stratified training images (drawn with a fixed split seed, the same for every --seed) "
             "as the validation set evaluated during training and choosing checkpoint-best.pth; the data's val/ "
             "(Fashion-MNIST: the test set) is then not read, and --train-subset/--label-fraction draw from the "
             "other training images (--label-fraction still of the whole training set: 0.01 of Fashion-MNIST is "
             "600). --eval ignores it and evaluates on val/")
    add_data_loading_options(g)
    g = p.add_argument_group("augmentation")
    add(g, "--aa", kind=Str(optional=True), default="rand-m9-mstd0.5-inc1", metavar="POLICY",
        help="timm auto-augment policy (rand-..., augmix-..., original, v0, ...), or 'none'; for images that are not "
             "8-bit RGB a policy from a default or a recipe becomes its geometric part (rotate, shear, translate), "
             "one typed here is refused")
    add(g, "--color-jitter", kind=Float(min=0), default=None,
        help="colour jitter strength (8-bit RGB only; default none, as the reference recipe: timm would add 0.4)")
    add(g, "--reprob", kind=Float(min=0, max=1), default=0.25, help="random erasing probability")
    add(g, "--mixup", kind=Float(min=0), default=0.0, help="mixup alpha (0: off)")
    add(g, "--cutmix", kind=Float(min=0), default=0.0, help="cutmix alpha (0: off)")
    add(g, "--smoothing", kind=Float(min=0, max=1, open_max=True), default=0.2, help="label smoothing")
    g = p.add_argument_group("optimisation")
    add_optimisation_options(g)
    p.set_defaults(epochs=600, warmup_epochs=0, blr=2e-4, min_lr=1e-6, weight_decay=0.3)
    add(g, "--layer-decay", kind=Float(min=0, max=1, open_min=True), default=0.9,
        help="lr scale ratio between consecutive layers (1: off)")
    add(g, "--layer-decay-type", kind=Str(list(LAYER_DECAY_TYPES)), default="single",
        help="'single': one id per block; 'group': 12 groups of three blocks (base and up)")
    add(g, "--model-ema", kind=Bool(), default=True, help="keep an EMA of the weights")
    add(g, "--model-ema-decay", kind=Float(min=0, max=1, open_max=True), default=0.9999)
    g = p.add_argument_group("run")
    add(g, "--eval", action="store_true",
        help="evaluate and exit: the --resume CKPT if given, else the --finetune one (with its head), else the "
             "newest checkpoint in --output-dir")
    add_run_options(g, "output/finetune")
    g = p.add_argument_group("monitoring")
    add(g, "--eval-every-epochs", kind=Int(min=1), default=1,
        help="evaluate (and pick the best checkpoint) every N epochs; always at the end")
    add(g, "--model-ema-eval", kind=Bool(), default=True, help="also evaluate the EMA weights every epoch")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Option values: parser defaults < -c config < probe defaults (with --linear-probe) < the command line."""
    parser = build_parser()
    args = parse_with_config(parser, argv)  # leaves the config's values on the parser as its defaults
    if args.linear_probe:  # over the config's values (now the parser's defaults), under the command line's
        typed = args.typed
        parser.set_defaults(**PROBE_DEFAULTS)
        args = parser.parse_args(argv)
        check_all(parser, args)
        args.typed = typed
    return args


def probe_settings(args) -> str:
    """The settings a linear probe runs with, for the log."""
    return ", ".join(f"{k}={getattr(args, k)}" for k in PROBE_DEFAULTS if k != "blr") + \
        (f", lr={args.lr}" if args.lr is not None else f", blr={args.blr}")


def check_augment_policy(aa):
    """timm's auto-augment names, checked now (timm raises deep inside create_transform, or ignores typos)."""
    if aa is None:
        return
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    hparams = {"translate_const": 100, "img_mean": (124, 116, 104)}
    try:
        if aa.startswith("rand"):
            rand_augment_transform(aa, hparams)
        elif aa.startswith("augmix"):
            augment_and_mix_transform(aa, hparams)
        else:
            auto_augment_transform(aa, hparams)
    except Exception as e:  # timm: AssertionError / KeyError / ValueError for unknown parts
        raise UsageError(f"--aa {aa!r} is not a timm auto-augment policy ({type(e).__name__}: {e}); e.g. "
                         "rand-m9-mstd0.5-inc1, augmix-m5-w3, original, v0, or none") from None


def validate(args):
    """Every check that can fail on user input without reading data or checkpoints, before anything is written."""
    try:
        if args.model is not None:
            args.model = get_variant(args.model).name
    except ValueError:
        raise UsageError(f"unknown model {shown(args.model)}; valid models: {', '.join(USER_VARIANTS)}") from None
    args.input_size = input_size(args.input_size)
    if args.train_subset is not None and args.label_fraction is not None:
        raise UsageError("give --train-subset or --label-fraction, not both")
    if args.val_split is not None and args.val_subset is not None and not args.eval:
        raise UsageError("give --val-split (a held-out part of the training set) or --val-subset, not both")
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        raise UsageError(f"mixup/cutmix pair images within a batch: --batch-size must be even, got {args.batch_size}")
    if args.aa in ("none", ""):
        args.aa = None
    check_augment_policy(args.aa)
    if args.finetune is not None and not os.path.exists(args.finetune):
        raise UsageError(f"--finetune checkpoint not found: {args.finetune}")
    if args.resume not in ("auto", "none") and not os.path.isfile(args.resume):
        raise UsageError(f"--resume checkpoint not found: {args.resume}")
    if args.eval and args.finetune is None and args.resume == "none":
        raise UsageError("--eval needs a checkpoint: --finetune CKPT or --resume CKPT (or 'auto' with --output-dir)")
    if not args.eval:  # evaluation writes nothing
        check_writable_dir(args.output_dir)
