"""Options of `python -m fcmae.pretrain`, each declared once with its type and range (fcmae.runtime.options), and
the checks that need no data. Defaults: the reference recipe (configs/pretrain/<model>.yaml per variant).

Light to import (no torch, no timm): `python -m fcmae.pretrain --help` builds this parser before the training code
loads. START_RULES, which needs fcmae.runtime.run_start (torch), is made on first use.
"""
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
    input_size,
    shown,
)
from models.backends import BACKENDS
from models.choices import GRN_STATS
from models.variants import USER_VARIANTS, get_variant

FORMAT = "fcmae-pretrain"
EXAMPLES = """examples:
  # a few minutes on the built-in Fashion-MNIST, on the CPU
  python -m fcmae.pretrain -c fashion_mnist_demo
  # the reference recipe of convnextv2_base on your own images (folder or tar shards), 4 GPUs
  torchrun --nproc-per-node 4 -m fcmae.pretrain -c convnextv2_base --data-path /data/unlabelled \\
      --accum-iter 16 --output-dir runs/base
  # 4-band tiles: statistics first (python -m fcmae.tools.data_stats /data/tiles --in-chans 4), then
  python -m fcmae.pretrain --model convnextv2_atto --in-chans 4 --mean 0.1 0.2 0.3 0.4 --std 0.1 0.1 0.1 0.1 \\
      --data-path /data/tiles --input-size 128 --knn-every-epochs 0
"""


def __getattr__(name):
    """START_RULES on first use: fcmae.runtime.run_start imports torch, which --help must not wait for."""
    if name != "START_RULES":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from fcmae.runtime.run_start import StartRules

    rules = StartRules(
        format=FORMAT,
        what="an FCMAE pretraining checkpoint (to start from pretrained weights, fine-tune it: python -m finetune "
             "--finetune ...)",
        fixed=("model", "in_chans", "decoder_dim", "decoder_depth", "encoder_grn"),  # they shape the model
        run_only=RUN_ONLY | {"vis_every_epochs", "knn_every_epochs", "knn_data", "knn_bank", "knn_queries", "knn_k"},
        defaults=build_parser().defaults())
    globals()["START_RULES"] = rules
    return rules


def build_parser() -> ArgParser:
    p = ArgParser(prog="python -m fcmae.pretrain", recipes="pretrain", epilog=EXAMPLES,
                  description="FCMAE self-supervised pretraining of ConvNeXt V2 on unlabelled images\n"
                              "(defaults: the reference recipe of convnextv2_atto; -c NAME for the others).")
    add_config_option(p)
    g = p.add_argument_group("model")
    add(g, "--model", kind=Str(), default="convnextv2_atto", help=f"one of: {', '.join(USER_VARIANTS)}")
    add(g, "--backend", kind=Str(list(BACKENDS)), default="sparse",
        help="how the encoder skips masked patches: 'sparse' (fast), 'dense' (masked-dense oracle), 'minkowski' "
             "(MinkowskiEngine, optional build), 'naive' (ablation: mask once after the stem, dense convs leak)")
    add(g, "--grn-stats", kind=Str(list(GRN_STATS)), default="sample",
        help="GRN statistics over each image's visible sites ('sample', matches fine-tuning) or over the whole "
             "per-device batch ('batch', as the reference sparse code)")
    add_model_input_options(g)
    add(g, "--mask-ratio", kind=Float(min=0, max=1, open_min=True, open_max=True), default=0.6,
        help="fraction of 32x32 patches masked; each image keeps int(L x (1 - ratio))")
    add(g, "--decoder-dim", kind=Int(min=1), default=512)
    add(g, "--decoder-depth", kind=Int(min=1), default=1)
    add(g, "--norm-pix-loss", kind=Bool(), default=True, help="per-patch normalised targets")
    add(g, "--encoder-grn", kind=Bool(), default=True,
        help="GRN in the encoder blocks (--no-encoder-grn: the ConvNeXt V1-style ablation, GRN held at identity)")
    g = p.add_argument_group("data")
    add(g, "--dataset", kind=Str(["fashion-mnist"]), default="fashion-mnist",
        help="built-in dataset, used when --data-path is not given (Debian's dataset-fashion-mnist)")
    add(g, "--data-path", "--data-dir", kind=Str(optional=True), default=None, metavar="PATH",
        help="a folder of images (flat or in class subfolders; labels unused), or WebDataset tar shards: a folder "
             "of .tar files or a brace pattern 'train-{000000..000146}.tar'")
    add_data_loading_options(g)
    add(g, "--augment-on-device", action="store_true",
        help="decode JPEGs in batches on the training device (nvJPEG on GPUs) and crop, flip and resize them there; "
             "the workers only read files and draw the same boxes, flips and masks (other files are decoded on the "
             "CPU as without it; docs/gpu.md)")
    g = p.add_argument_group("optimisation")
    add_optimisation_options(g)
    p.set_defaults(epochs=800, warmup_epochs=40, blr=1.5e-4, min_lr=0.0, weight_decay=0.05)
    g = p.add_argument_group("run")
    add_run_options(g, "output/pretrain")
    g = p.add_argument_group("monitoring")
    add(g, "--vis-every-epochs", kind=Int(min=1), default=1,
        help="reconstruction picture and collapse monitor every N epochs (and at the end)")
    add(g, "--show-channels", kind=Int(min=0), nargs="+", default=None,
        help="for --in-chans other than 3: three channel indices shown as RGB in the pictures (default: one grey "
             "panel per channel)")
    add(g, "--knn-every-epochs", kind=Int(min=0), default=None,
        help="kNN top-1 of the encoder every N epochs (0: off; default 1 when labels are at hand: the built-in "
             "dataset or --knn-data)")
    add(g, "--knn-data", kind=Str(optional=True), default=None, metavar="PATH",
        help="labelled folder (train/<class>/*, val/<class>/*) or shards for the kNN monitor")
    add(g, "--knn-bank", kind=Int(min=1), default=2000, help="labelled training images the queries look up")
    add(g, "--knn-queries", kind=Int(min=1), default=1000, help="validation images classified by kNN")
    add(g, "--knn-k", kind=Int(min=1), default=20, help="neighbours that vote")
    return p


def validate(args):
    """Every check that can fail on user input without reading data or checkpoints."""
    from models.masking import mask_grid, num_visible  # torch: after parsing

    try:
        args.model = get_variant(args.model).name
    except ValueError:
        raise UsageError(f"unknown model {shown(args.model)}; valid models: {', '.join(USER_VARIANTS)}") from None
    try:
        args.input_size = input_size(args.input_size)
        grid = mask_grid(*args.input_size)
        num_visible(grid[0] * grid[1], args.mask_ratio)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.backend == "minkowski":
        from models.minkowski_compat import import_minkowski

        try:
            import_minkowski()
        except ImportError as e:
            raise UsageError(str(e)) from None
    if args.resume not in ("auto", "none") and not os.path.exists(args.resume):
        raise UsageError(f"--resume checkpoint not found: {args.resume}")
    if args.show_channels is not None and (len(args.show_channels) != 3 or max(args.show_channels) >= args.in_chans):
        raise UsageError(f"--show-channels takes three channel indices below --in-chans {args.in_chans}, "
                         f"got {args.show_channels}")
    if args.augment_on_device:
        from fcmae.data.device_augment import check_options  # imports torch: not at module level (--help)

        check_options(args.data_path, args.in_chans)
    if args.knn_every_epochs is None:
        args.knn_every_epochs = 1 if (args.knn_data or not args.data_path) else 0
    if args.knn_every_epochs and args.data_path and not args.knn_data:
        raise UsageError("--knn-every-epochs needs labelled images: pass --knn-data (train/ and val/ class folders "
                         "or shards), or --knn-every-epochs 0")
    check_writable_dir(args.output_dir)
