"""FCMAE pretraining of ConvNeXt V2: `python -m fcmae.pretrain --model convnextv2_atto ...` (console script
`fcmae-pretrain`). Parse, validate, build, then run the shared training loop (fcmae/loop.py).

Data path from image to loss: fcmae/data.py (images -> augmented tensors and masks) -> models/fcmae.py (sparse
encoder, decoder, loss) -> fcmae/engine.py (one optimiser step) -> fcmae/loop.py (the loop, logging,
checkpoints); fcmae/pretrain_stage.py adds pictures, the collapse monitor and the kNN monitor.
"""
import logging
import os

import torch
from timm.optim import param_groups_weight_decay

from finetune.data import build_datasets
from models import BACKENDS, GRN_STATS, VARIANTS, create_fcmae
from models.ablations import remove_grn
from models.fcmae import compile_for_training
from models.masking import mask_grid, num_visible
from models.variants import get_variant

from .cli import check_writable_dir, exit_with
from .data import FashionMNIST, MaskedImages, normalize, pretrain_transform, resolve_mean_std
from .distributed import cleanup, device_for, init_distributed, world_size_from_env
from .errors import UsageError
from .loop import Loop, LoopConfig, check_same_settings, find_start, prepare_output
from .optim import adamw, cosine_schedule, effective_lr, epoch_steps
from .options import (ArgParser, Bool, Float, Int, Str, add, add_data_loading_options, add_model_input_options,
                      add_optimisation_options, add_run_options, input_size, parse_with_config, plain)
from .pretrain_stage import FORMAT, KnnMonitor, PretrainStage
from .sampling import EpochSampler, SeededDataset
from .shards import open_dataset as open_images

log = logging.getLogger("fcmae")

# options that shape the model: a resumed run must have the same; and those free to change between a run and
# its resume (how or how far to run, not what is computed)
FIXED = ("model", "in_chans", "decoder_dim", "decoder_depth", "encoder_grn")
RUN_ONLY = {"config", "resume", "overwrite", "output_dir", "max_steps", "num_workers", "log_every", "save_every_steps",
            "keep_checkpoints", "device", "bad_image", "max_bad_fraction", "vis_every_epochs", "knn_every_epochs",
            "knn_data", "knn_bank", "knn_queries", "knn_k", "epochs", "compile"}


def build_parser() -> ArgParser:
    p = ArgParser(prog="python -m fcmae.pretrain",
                  description="FCMAE self-supervised pretraining of ConvNeXt V2 (defaults: the reference recipe).")
    add(p, "-c", "--config", default=None, help="YAML file of option defaults (e.g. configs/pretrain/<model>.yaml)")
    g = p.add_argument_group("model")
    add(g, "--model", kind=Str(), default="convnextv2_atto", help=f"one of: {', '.join(VARIANTS)}")
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
    add(g, "--data-path", kind=Str(optional=True), default=None,
        help="a folder of images (flat or in class subfolders; labels unused), or WebDataset tar shards: a folder "
             "of .tar files or a brace pattern 'train-{000000..000146}.tar'")
    add_data_loading_options(g)
    g = p.add_argument_group("optimisation")
    add_optimisation_options(g)
    p.set_defaults(epochs=800, warmup_epochs=40, blr=1.5e-4, min_lr=0.0, weight_decay=0.05)
    g = p.add_argument_group("run")
    add_run_options(g, "output/pretrain")
    add(g, "--vis-every-epochs", kind=Int(min=1), default=1,
        help="reconstruction picture and collapse monitor every N epochs (and at the end)")
    add(g, "--show-channels", kind=Int(min=0), nargs="+", default=None,
        help="for --in-chans other than 3: three channel indices shown as RGB in the pictures (default: one grey "
             "panel per channel)")
    add(g, "--knn-every-epochs", kind=Int(min=0), default=None,
        help="kNN top-1 of the encoder every N epochs (0: off; default 1 when labels are at hand: the built-in "
             "dataset or --knn-data)")
    add(g, "--knn-data", kind=Str(optional=True), default=None,
        help="labelled folder (train/<class>/*, val/<class>/*) or shards for the kNN monitor")
    add(g, "--knn-bank", kind=Int(min=1), default=2000, help="labelled training images the queries look up")
    add(g, "--knn-queries", kind=Int(min=1), default=1000, help="validation images classified by kNN")
    add(g, "--knn-k", kind=Int(min=1), default=20, help="neighbours that vote")
    return p


def validate(args):
    """Every check that can fail on user input without reading data or checkpoints."""
    try:
        args.model = get_variant(args.model).name
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
    if args.knn_every_epochs is None:
        args.knn_every_epochs = 1 if (args.knn_data or not args.data_path) else 0
    if args.knn_every_epochs and args.data_path and not args.knn_data:
        raise UsageError("--knn-every-epochs needs labelled images: pass --knn-data (train/ and val/ class folders "
                         "or shards), or --knn-every-epochs 0")
    check_writable_dir(args.output_dir)


class PretrainData:
    """The unlabelled training images and how a batch is prepared on the device: normalised there (the loader
    moves uint8 or native-unit float32 tensors) and optionally made channels-last."""

    def __init__(self, dataset, mean, std, channels_last: bool):
        self.dataset, self.mean, self.std, self.channels_last = dataset, mean, std, channels_last

    def prepare(self, imgs, target):
        imgs = normalize(imgs, self.mean, self.std)
        if self.channels_last:
            imgs = imgs.contiguous(memory_format=torch.channels_last)
        return imgs, target


def pretrain_data(args) -> PretrainData:
    resolve_mean_std(args.in_chans, args.mean, args.std)  # a wrong list stops us before the data is read
    transform = pretrain_transform(args.input_size)
    if args.data_path:
        dataset = open_images(args.data_path, transform=transform, input_size=args.input_size, in_chans=args.in_chans,
                              bad_image=args.bad_image, max_bad_fraction=args.max_bad_fraction)
        kind = dataset.kind
    else:
        dataset, kind = FashionMNIST("train", transform=transform, in_chans=args.in_chans), None
    mean, std = resolve_mean_std(args.in_chans, args.mean, args.std, kind=kind)
    return PretrainData(dataset, mean, std, args.channels_last)


class KnnSets:
    def __init__(self, bank, queries, num_classes):
        self.bank, self.queries, self.num_classes = bank, queries, num_classes


def knn_data(args) -> KnnSets:
    """Labelled bank and query sets for the kNN monitor, through fine-tuning's evaluation transform at the
    pretraining input size: --knn-data, else the built-in dataset's labels (stratified, seeded subsets)."""
    data = build_datasets(data_path=args.knn_data, input_size=args.input_size, in_chans=args.in_chans,
                          mean=args.mean, std=args.std, train_subset=args.knn_bank, val_subset=args.knn_queries,
                          seed=args.seed, max_bad_fraction=args.max_bad_fraction, augment=False)
    return KnnSets(data.train, data.val, len(data.classes))


def main(argv=None) -> dict:
    args = parse_with_config(build_parser(), argv)
    validate(args)
    # Everything that reads user input (data, checkpoints) before anything is written or a process group joined:
    world = world_size_from_env()
    data = pretrain_data(args)
    steps_per_epoch = epoch_steps(len(data.dataset), args.batch_size, args.accum_iter, world)
    knn_sets = knn_data(args) if args.knn_every_epochs else None
    path, state = find_start(args.output_dir, args.resume, args.overwrite, FORMAT, "an FCMAE pretraining checkpoint "
                             "(to start from pretrained weights, fine-tune it: python -m finetune --finetune ...)")
    changed = check_same_settings(state["args"], plain(args), path, FIXED, RUN_ONLY) if state is not None else None
    dist_info = init_distributed(args.device)
    try:
        return train(args, dist_info, data, steps_per_epoch, knn_sets, path, state, changed)
    finally:
        cleanup()


def build_model(args, device):
    model = create_fcmae(args.model, backend=args.backend, grn_stats=args.grn_stats, mask_ratio=args.mask_ratio,
                         decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth,
                         norm_pix_loss=args.norm_pix_loss, in_chans=args.in_chans)
    if not args.encoder_grn:
        remove_grn(model.encoder)
    model.encoder.grad_checkpointing = args.grad_checkpointing
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def train(args, dist_info, data, steps_per_epoch, knn_sets, path, state, changed=None) -> dict:
    device = device_for(args.device, dist_info)
    prepare_output(args.output_dir, dist_info, overwrite_fresh=args.overwrite and state is None, warning=changed)
    torch.manual_seed(args.seed + dist_info.rank)
    model = build_model(args, device)
    net = model
    if dist_info.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist_info.local_rank] if device.type == "cuda" else None)
    if args.compile:
        compile_for_training(model)  # in place: state-dict keys do not change
    eff_batch, lr = effective_lr(args.batch_size, args.accum_iter, dist_info.world_size, args.blr, args.lr)
    log.info("effective batch %d = %d x %d accumulation x %d processes; lr %.3e", eff_batch, args.batch_size,
             args.accum_iter, dist_info.world_size, lr)
    # no weight decay on 1-D tensors, biases and the mask token (the reference decayed GRN and the token by accident)
    groups = param_groups_weight_decay(model, args.weight_decay, no_weight_decay_list=["mask_token"])
    groups = [dict(g, params=[p for p in g["params"] if p.requires_grad]) for g in groups]
    optimizer = adamw(groups, lr, (0.9, 0.95), device.type)
    scheduler = cosine_schedule(optimizer, args.epochs, steps_per_epoch, args.warmup_epochs, args.min_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    # Masks are drawn per sample from (seed, epoch, index) like the augmentation: the same on any number of
    # processes, with any accumulation, and after a resume.
    grid = mask_grid(*args.input_size)
    # the pretraining transform and the mask draw only from torch's generator: only that is seeded per sample
    dataset = SeededDataset(MaskedImages(data.dataset, grid[0] * grid[1], args.mask_ratio), seed=args.seed,
                            rngs=("torch",))
    sampler = EpochSampler(len(dataset), seed=args.seed, rank=dist_info.rank, world_size=dist_info.world_size)
    knn = None
    if knn_sets is not None:
        knn = KnnMonitor(knn_sets.bank, knn_sets.queries, knn_sets.num_classes, args.knn_every_epochs, k=args.knn_k,
                         num_workers=min(args.num_workers, 2))
    description = (f"pretraining {args.model} ({args.backend} backend, grn {args.grn_stats}) on {len(dataset)} images "
                   f"of {args.in_chans} channels at {'x'.join(map(str, args.input_size))}, mask {args.mask_ratio:.2f}, "
                   f"{steps_per_epoch} steps/epoch")
    stage = PretrainStage(model, net, dataset, device, args.vis_every_epochs, knn, data.prepare, data.mean, data.std,
                          args.show_channels, description)
    cfg = LoopConfig(output_dir=args.output_dir, model_name=args.model, epochs=args.epochs,
                     steps_per_epoch=steps_per_epoch, batch_size=args.batch_size, accum_iter=args.accum_iter,
                     max_steps=args.max_steps, amp=args.amp, clip_grad=args.clip_grad, num_workers=args.num_workers,
                     save_every_steps=args.save_every_steps, keep_checkpoints=args.keep_checkpoints,
                     log_every=args.log_every, skip_nonfinite=args.skip_nonfinite, args=plain(args))
    loop = Loop(cfg, dist_info, device, dataset, sampler, stage, optimizer, scheduler, scaler, prepare=data.prepare)
    if state is not None:
        loop.resume(state, path)
    return loop.run()


def cli(argv=None):
    exit_with(main, argv)


if __name__ == "__main__":
    cli()
