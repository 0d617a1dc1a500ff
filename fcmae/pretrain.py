"""FCMAE pretraining of ConvNeXt V2: `python -m fcmae.pretrain --model convnextv2_atto ...`.

Data path from image to loss: fcmae/data.py (images -> augmented tensors) -> models/fcmae.py (mask, sparse
encoder, decoder, loss) -> fcmae/engine.py (one optimiser step). This file wires them up, logs and checkpoints.
"""
import json
import logging
import os
import signal
import sys
import time

import torch
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from models import BACKENDS, GRN_STATS, VARIANTS, create_fcmae
from models.masking import mask_grid, num_visible
from models.variants import get_variant

from . import checkpoint as ckpt
from . import monitor
from .cli import check_writable_dir, run_cli, setup_logging
from .config import (ArgParser, UsageError, add, add_bad_image_options, add_skip_nonfinite, add_speed_options,
                     check_bad_image_options, input_size, parse_with_config, to_yaml)
from .data import EpochSampler, FashionMNIST, MaskedImages, SeededDataset, image_folder, pretrain_transform
from .distributed import all_reduce_mean, cleanup, init_distributed, world_size_from_env
from .engine import NonFiniteGuard, channels_last, train_step
from .images import BadImageMonitor
from .progress import Progress
from .visualize import reconstruction_grid

log = logging.getLogger("fcmae")
FORMAT = "fcmae-pretrain"


def build_parser() -> ArgParser:
    p = ArgParser(prog="python -m fcmae.pretrain",
                  description="FCMAE self-supervised pretraining of ConvNeXt V2 (defaults: the reference recipe).")
    add(p, "-c", "--config", default=None, help="YAML file of option defaults (e.g. configs/pretrain/<model>.yaml)")
    g = p.add_argument_group("model")
    add(g, "--model", default="convnextv2_atto", help=f"one of: {', '.join(VARIANTS)}")
    add(g, "--backend", default="sparse", choices=list(BACKENDS),
          help="sparse execution: 'sparse' (fast, skips masked sites), 'dense' (masked-dense oracle), "
               "'minkowski' (MinkowskiEngine, needs the optional build)")
    add(g, "--grn-stats", default="sample", choices=list(GRN_STATS),
          help="GRN statistics over each image's visible sites ('sample', matches fine-tuning) or over the "
               "whole per-device batch ('batch', as the reference sparse code)")
    add(g, "--input-size", type=int, nargs="+", default=[224], help="224 (square) or 'H W'; multiples of 32")
    add(g, "--mask-ratio", type=float, default=0.6, help="fraction of 32x32 patches masked")
    add(g, "--decoder-dim", type=int, default=512)
    add(g, "--decoder-depth", type=int, default=1)
    add(g, "--norm-pix-loss", action=argparse_bool(), default=True, help="per-patch normalised targets")
    g = p.add_argument_group("data")
    add(g, "--dataset", default="fashion-mnist", choices=["fashion-mnist"],
          help="built-in dataset, used when --data-path is not given (Debian's dataset-fashion-mnist)")
    add(g, "--data-path", default=None, help="folder of images, with or without class subfolders (labels unused)")
    add(g, "--num-workers", type=int, default=2)
    add_bad_image_options(g)
    g = p.add_argument_group("optimisation")
    add(g, "--batch-size", type=int, default=64, help="images per process per micro-batch")
    add(g, "--accum-iter", type=int, default=1, help="micro-batches per optimiser step")
    add(g, "--epochs", type=int, default=800)
    add(g, "--max-steps", type=int, default=None, help="stop after this many optimiser steps (smoke runs)")
    add(g, "--warmup-epochs", type=float, default=40)
    add(g, "--blr", type=float, default=1.5e-4, help="base lr: lr = blr * effective batch / 256")
    add(g, "--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    add(g, "--min-lr", type=float, default=0.0)
    add(g, "--weight-decay", type=float, default=0.05)
    add(g, "--clip-grad", type=float, default=None)
    add(g, "--amp", default="none", choices=["none", "bf16", "fp16"], help="autocast precision (loss stays float32)")
    add_speed_options(g)
    add_skip_nonfinite(g)
    g = p.add_argument_group("run")
    add(g, "--output-dir", default="output/pretrain")
    add(g, "--resume", default="auto", help="'auto' (newest loadable checkpoint in --output-dir), a path, or 'none'")
    add(g, "--save-every-steps", type=int, default=None, help="also checkpoint every N steps (mid-epoch)")
    add(g, "--keep-checkpoints", type=int, default=2)
    add(g, "--log-every", type=int, default=20, help="progress line every N steps")
    add(g, "--vis-every-epochs", type=int, default=1, help="reconstruction image to TensorBoard every N epochs")
    add(g, "--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add(g, "--seed", type=int, default=0)
    return p


def argparse_bool():
    import argparse

    return argparse.BooleanOptionalAction


def validate(args):
    """Every check that can fail on user input, before anything is written."""
    try:
        args.model = get_variant(args.model).name
        args.input_size = input_size(args.input_size)
        grid = mask_grid(*args.input_size)
        num_visible(grid[0] * grid[1], args.mask_ratio)
    except ValueError as e:
        raise UsageError(str(e)) from None
    for name in ["batch_size", "accum_iter", "epochs"]:
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.warmup_epochs < 0:
        raise UsageError("--warmup-epochs must be >= 0")
    if args.skip_nonfinite < 0:
        raise UsageError(f"--skip-nonfinite must be >= 0, got {args.skip_nonfinite}")
    check_bad_image_options(args)
    if args.save_every_steps is not None and args.save_every_steps < 1:
        raise UsageError(f"--save-every-steps must be >= 1, got {args.save_every_steps}")
    if args.keep_checkpoints < 1:
        raise UsageError(f"--keep-checkpoints must be >= 1, got {args.keep_checkpoints}")
    if args.resume not in ("auto", "none") and not os.path.isfile(args.resume):
        raise UsageError(f"--resume checkpoint not found: {args.resume}")
    if args.backend == "minkowski":
        from models.minkowski_compat import import_minkowski

        try:
            import_minkowski()
        except ImportError as e:
            raise UsageError(str(e)) from None
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device} requested but CUDA is not available; use --device cpu")
    check_writable_dir(args.output_dir)


def build_dataset(args):
    transform = pretrain_transform(args.input_size)
    if args.data_path:
        return image_folder(args.data_path, transform=transform, input_size=args.input_size,
                            bad_image=args.bad_image, max_bad_fraction=args.max_bad_fraction)
    return FashionMNIST("train", transform=transform)


def build_optimizer(model, args, world_size):
    eff_batch = args.batch_size * args.accum_iter * world_size
    if args.lr is None:
        args.lr = args.blr * eff_batch / 256
    log.info("effective batch %d = %d x %d accumulation x %d processes; lr %.3e", eff_batch, args.batch_size,
             args.accum_iter, world_size, args.lr)
    # no weight decay on 1-D tensors, biases and the mask token (the reference decayed GRN and the token by accident)
    groups = param_groups_weight_decay(model, args.weight_decay, no_weight_decay_list=["mask_token"])
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))


def build_scheduler(optimizer, args, steps_per_epoch):
    total = args.epochs * steps_per_epoch
    warmup = min(int(args.warmup_epochs * steps_per_epoch), total - 1)
    return CosineLRScheduler(optimizer, t_initial=max(total - warmup, 1), lr_min=args.min_lr, warmup_t=warmup,
                             warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)


class StopRequest:
    """SIGTERM/SIGINT: finish the current step, save a checkpoint, exit cleanly."""

    def __init__(self):
        self.signal = None
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name


def epoch_steps(num_images: int, args, world_size: int) -> int:
    """Optimiser steps in one pass over the data: each process takes ceil(images / processes) of it
    (EpochSampler), in micro-batches of --batch-size, --accum-iter of them per step."""
    steps = -(-num_images // world_size) // args.batch_size // args.accum_iter
    if steps < 1:
        raise UsageError(f"{num_images} images give no full step of {args.batch_size} (batch) x {args.accum_iter} "
                         f"(accumulation) x {world_size} processes; lower --batch-size or --accum-iter, or add images")
    return steps


def explicit_resume(args):
    """`--resume PATH`: read and check it now, so a wrong file stops the run before anything is written."""
    if args.resume in ("auto", "none"):
        return None
    state = ckpt.load(args.resume)
    check_resumable(state, args, args.resume)
    return state


def main(argv=None):
    parser = build_parser()
    args = parse_with_config(parser, argv)
    validate(args)
    # Everything that can fail on user input, before anything is written or a process group is joined:
    dataset = build_dataset(args)  # a missing or empty data folder
    epoch_steps(len(dataset), args, world_size_from_env())  # too few images for one step of every process
    state = explicit_resume(args)  # a missing, broken or mismatched checkpoint
    dist_info = init_distributed(args.device)
    try:
        train(args, dist_info, dataset, state)
    finally:
        cleanup()


def train(args, dist_info, dataset, state=None):
    device = torch.device(args.device if not args.device.startswith("cuda") or not dist_info.enabled
                          else f"cuda:{dist_info.local_rank}")
    os.makedirs(args.output_dir, exist_ok=True)
    setup_logging(args.output_dir, dist_info.is_main)
    torch.manual_seed(args.seed + dist_info.rank)

    # Masks are drawn per sample from (seed, epoch, index) like the augmentation: the same on any number of
    # processes, with any accumulation, and after a resume.
    grid = mask_grid(*args.input_size)
    dataset = SeededDataset(MaskedImages(dataset, grid[0] * grid[1], args.mask_ratio), seed=args.seed)
    sampler = EpochSampler(len(dataset), seed=args.seed, rank=dist_info.rank, world_size=dist_info.world_size)
    steps_per_epoch = epoch_steps(len(dataset), args, dist_info.world_size)
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)

    model = create_fcmae(args.model, backend=args.backend, grn_stats=args.grn_stats, mask_ratio=args.mask_ratio,
                         decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth,
                         norm_pix_loss=args.norm_pix_loss).to(device)
    model.encoder.grad_checkpointing = args.grad_checkpointing
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    model_without_ddp = model
    if dist_info.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist_info.local_rank] if device.type == "cuda" else None)
    if args.compile:
        # in place, so state-dict keys do not change; the sparse and minkowski encoders have data-dependent
        # shapes (one row per visible site) that torch.compile cannot trace, so there only the decoder is compiled
        (model_without_ddp if args.backend == "dense" else model_without_ddp.decoder).compile()
    optimizer = build_optimizer(model_without_ddp, args, dist_info.world_size)
    scheduler = build_scheduler(optimizer, args, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    step, history = 0, []
    path = args.resume
    if args.resume == "auto":
        path, state = ckpt.latest_loadable(args.output_dir)
        if state is not None:
            check_resumable(state, args, path)
    if state is not None:
        step, history = resume(state, model_without_ddp, optimizer, scaler)
        log.info("resumed from %s at step %d", path, step)
    if step >= total_steps:  # a finished run started again: keep its outputs as they are
        log.info("nothing to do: the run in %s is complete at step %d of %d", args.output_dir, step, total_steps)
        return
    if dist_info.is_main:
        ckpt.remove_stale_temporaries(args.output_dir)
        with open(os.path.join(args.output_dir, "config.yaml"), "w") as f:
            f.write(to_yaml(args))
    # purge_step: events a killed run logged after its last checkpoint are dropped, not shown twice
    writer = SummaryWriter(os.path.join(args.output_dir, "tensorboard"), purge_step=step or None) \
        if dist_info.is_main else None
    log.info("pretraining %s (%s backend, grn %s) on %d images at %s, mask %.2f, %d steps/epoch, %d steps",
             args.model, args.backend, args.grn_stats, len(dataset), "x".join(map(str, args.input_size)),
             args.mask_ratio, steps_per_epoch, total_steps)

    def save(step_now, epoch_now):
        if not dist_info.is_main:
            return
        state = {"format": FORMAT, "model_name": args.model, "model": model_without_ddp.state_dict(),
                 "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step_now,
                 "epoch": epoch_now, "args": vars(args) | {"input_size": list(args.input_size)},
                 "rng": ckpt.rng_state(), "history": history}
        log.info("saved %s", ckpt.save_training_state(args.output_dir, step_now, state, args.keep_checkpoints))

    stop = StopRequest()
    guard = NonFiniteGuard(args.skip_nonfinite)
    bad_images = BadImageMonitor(dataset)
    progress = Progress(total_steps, step, args.log_every)
    # fixed images and masks: the first 4 for the reconstruction picture (comparable from epoch to epoch, and
    # drawn without touching the training RNG), up to 32 for the collapse monitor
    monitor_imgs = torch.stack([dataset[i][0] for i in range(min(32, len(dataset)))])
    vis_imgs, vis_masks = monitor_imgs[:4], torch.stack([dataset[i][1] for i in range(min(4, len(dataset)))])
    latest_collapse = {}
    loader_kwargs = dict(batch_size=args.batch_size, num_workers=args.num_workers, drop_last=True,
                         pin_memory=device.type == "cuda", persistent_workers=False)
    while step < total_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch, start=done_in_epoch * args.accum_iter * args.batch_size)
        batches = iter(DataLoader(dataset, sampler=sampler, **loader_kwargs))
        for _ in range(done_in_epoch, steps_per_epoch):
            micro = [next(batches) for _ in range(args.accum_iter)]
            bad_images.poll()  # logs newly skipped files; too many stop the run before this step
            if args.channels_last:
                micro = channels_last(micro)
            scheduler.step_update(step)
            t0 = time.time()
            loss, grad_norm = train_step(model, micro, optimizer, scaler, device, args.amp, args.clip_grad)
            step += 1
            loss = all_reduce_mean(torch.tensor(loss, device=device)).item()
            guard.check(step, loss, grad_norm, args.amp)
            lr = optimizer.param_groups[0]["lr"]
            history.append(loss)
            rate = progress.update(step, epoch, loss, lr, grad_norm, args.batch_size * args.accum_iter
                                   * dist_info.world_size)
            if writer is not None:
                writer.add_scalar("train/loss", loss, step)
                writer.add_scalar("train/lr", lr, step)
                writer.add_scalar("train/grad_norm", grad_norm, step)
                writer.add_scalar("train/step_seconds", time.time() - t0, step)
                if rate is not None:
                    writer.add_scalar("train/images_per_second", rate, step)
            if stop.signal or step == total_steps or (args.save_every_steps and step % args.save_every_steps == 0):
                break
        epoch_done = step % steps_per_epoch == 0
        if writer is not None and (step == total_steps or (epoch_done and (step // steps_per_epoch)
                                                             % args.vis_every_epochs == 0)):
            writer.add_image("reconstruction", reconstruction_grid(model_without_ddp, vis_imgs.to(device),
                                                                    vis_masks.to(device)), step)
            collapse = monitor.collapse_stats(model_without_ddp.encoder, monitor_imgs)
            latest_collapse = monitor.scalars(collapse)
            for tag, value in latest_collapse.items():
                writer.add_scalar(tag, value, step)
            log.info("step %d %s", step, monitor.summary(collapse))
        save(step, step // steps_per_epoch)
        if stop.signal:
            log.info("received %s: checkpoint saved at step %d, exiting", stop.signal, step)
            break
    if writer is not None:
        writer.close()
    if dist_info.is_main and history:
        metrics = {"steps": step, "first_loss": history[0], "last_loss": history[-1],
                   "mean_last_10": sum(history[-10:]) / len(history[-10:])}
        if latest_collapse:
            metrics["collapse"] = latest_collapse
        with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
        log.info("done: %s", json.dumps(metrics))


def check_resumable(state, args, path: str):
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise UsageError(f"{path} is not an FCMAE pretraining checkpoint (format {found!r}); to start from "
                         "pretrained weights, fine-tune it (python -m finetune --finetune ...)")
    if state["model_name"] != args.model:
        raise UsageError(f"{path} holds {state['model_name']}, but --model is {args.model}")
    # the decoder's shape must match for the strict load; other settings may change (at the user's word)
    saved = state["args"]
    mismatched = [k for k in ("decoder_dim", "decoder_depth") if saved.get(k, getattr(args, k)) != getattr(args, k)]
    if mismatched:
        raise UsageError(f"{path} was trained with " + ", ".join(f"--{k.replace('_', '-')} {saved[k]}" for k in mismatched)
                         + "; pass the same values to resume it")


def resume(state, model, optimizer, scaler):
    model.load_state_dict(state["model"])  # strict: every tensor must match
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    ckpt.set_rng_state(state["rng"])
    return state["step"], list(state.get("history", []))


def cli(argv=None):
    sys.exit(run_cli(main, argv))


if __name__ == "__main__":
    cli()
