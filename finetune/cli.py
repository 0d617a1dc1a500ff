"""Fine-tuning of ConvNeXt V2 for classification: `python -m finetune --finetune PRETRAIN.pth ...` (console script
`fcmae-finetune`). Parse and check the options, read the starting point and the data, build, then run the shared
training loop (fcmae.runtime.loop); `--eval` evaluates a checkpoint and exits (finetune/evaluation.py).

From image to loss: fcmae/data/labelled.py (datasets, timm transforms) -> timm's ConvNeXt V2 (finetune/model.py)
-> mixup + criterion (finetune/loss.py) -> fcmae/runtime/step.py (one optimiser step) -> fcmae/runtime/loop.py,
with finetune/stage.py for the EMA, evaluation and the best checkpoint.
"""
import logging

import torch
from timm.utils import ModelEmaV3

from fcmae.data.labelled import Datasets, build_datasets
from fcmae.data.normalization import resolve_mean_std
from fcmae.data.sampling import EpochLoader
from fcmae.data.transforms import check_channel_options
from fcmae.runtime.cli import exit_with
from fcmae.runtime.distributed import device_for, in_process_group, world_size_from_env, wrap_ddp
from fcmae.runtime.loop import Loop, run_settings
from fcmae.runtime.optim import epoch_steps, lr_for_run, optimisation
from fcmae.runtime.run_start import open_output
from models.ablations import remove_grn
from models.variants import get_variant

from .evaluation import evaluate_checkpoint, val_loader
from .layer_decay import build_optimizer
from .loss import WithLoss, build_criterion
from .model import LinearProbe, create_classifier, init_from_pretrained
from .options import parse_args, probe_settings, validate
from .stage import FinetuneStage, seed_all
from .start import FinetuneStart, resolve_classes, starting_point

log = logging.getLogger("fcmae")


def run(argv=None) -> dict:
    """Parse, check, then train (returns metrics.json's content) or evaluate (returns the accuracies)."""
    args = parse_args(argv)
    validate(args)
    check_channel_options(args.in_chans, args.aa, args.color_jitter, typed=args.typed)
    resolve_mean_std(args.in_chans, args.mean, args.std)  # wrong lists stop us before any data is read
    if args.eval:
        return in_process_group(args.device, lambda dist_info: evaluate_checkpoint(args, dist_info, datasets))
    # Everything that reads user input (checkpoints, data) comes before anything is written or a group joined.
    start = starting_point(args)
    data = datasets(args)
    resolve_classes(args, data.classes, start.head_classes)
    steps_per_epoch = epoch_steps(len(data.train), args.batch_size, args.accum_iter, world_size_from_env())
    return in_process_group(args.device, lambda dist_info: train(args, dist_info, start=start, data=data,
                                                                 steps_per_epoch=steps_per_epoch))


def main(argv=None):
    """Console entry point: exit code 0, or 2 with a one-line `error: ...` for bad input."""
    exit_with(run, argv)


def datasets(args, train: bool = True) -> Datasets:
    return build_datasets(data_path=args.data_path, input_size=args.input_size, in_chans=args.in_chans,
                          mean=args.mean, std=args.std, aa=args.aa, reprob=args.reprob, color_jitter=args.color_jitter,
                          train_subset=args.train_subset if train else None,
                          label_fraction=args.label_fraction if train else None, val_subset=args.val_subset,
                          seed=args.seed, bad_image=args.bad_image, max_bad_fraction=args.max_bad_fraction,
                          val_split=args.val_split if train else None, typed=args.typed)


def to_channels_last(images, targets):
    return images.contiguous(memory_format=torch.channels_last), targets


def check_val_files(loader, stage):
    """Read every validation file once before training, so too many unreadable ones stop the run now, not after
    the first training epoch (the monitor logs each bad file and raises past the limit)."""
    log.info("checking the %d validation images", len(loader.sampler))
    for _ in loader:
        pass
    stage.poll_data()


def train(args, dist_info, *, start: FinetuneStart, data: Datasets, steps_per_epoch: int) -> dict:
    device = device_for(args.device, dist_info)
    open_output(args.output_dir, dist_info, start.run, args.overwrite)
    for replaced in data.replaced:  # augmentations a default or recipe asked for that the images cannot take
        log.info(replaced)
    seed_all(args.seed)  # the same initial weights on every process (and so in the EMA copy each one makes)
    model = create_classifier(args.model, args.nb_classes, args.drop_path, args.in_chans)
    if start.pretrained is not None:
        init_from_pretrained(model, start.pretrained, args.keep_head)
        log.info("initialised %s from %s (%s)", args.model, args.finetune,
                 "head kept" if args.keep_head else "classifier re-initialised, std 2e-5")
    if not args.encoder_grn:
        remove_grn(model)
    model.to(device)
    model.set_grad_checkpointing(args.grad_checkpointing)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    mixup_fn, criterion = build_criterion(args)
    # a linear probe trains the head only: the frozen encoder runs without autograd, in eval mode
    net = wrap_ddp(WithLoss(LinearProbe(model) if args.linear_probe else model, criterion), dist_info, device)
    if args.compile:
        net = torch.compile(net)
    lr = lr_for_run(args, dist_info.world_size)
    log.info("layer decay %s %.2f", args.layer_decay_type, args.layer_decay)
    optimizer = build_optimizer(model, get_variant(args.model).depths, lr=lr, weight_decay=args.weight_decay,
                                layer_decay=args.layer_decay, layer_decay_type=args.layer_decay_type,
                                device_type=device.type)
    opt = optimisation(optimizer, args, steps_per_epoch, device.type)

    loader = EpochLoader(data.train, seed=args.seed, rank=dist_info.rank, world_size=dist_info.world_size,
                         batch_size=args.batch_size, num_workers=args.num_workers, pin_memory=device.type == "cuda")
    held_out = " held out from the training set (--val-split)" if args.val_split else ""
    description = (f"fine-tuning {args.model} on {len(data.train)} images ({args.nb_classes} classes, "
                   f"{len(data.val)} val images{held_out}) of {args.in_chans} channels at "
                   f"{'x'.join(map(str, args.input_size))}: {steps_per_epoch} steps/epoch")
    if args.linear_probe:
        description += ("; linear probe: encoder frozen (eval mode, no gradients), head.norm + head.fc trained; "
                        + probe_settings(args))
    val = val_loader(data.val, args.batch_size, args.num_workers, dist_info)
    stage = FinetuneStage(model=model, net=net, ema=ema, mixup_fn=mixup_fn, data=data, val_loader=val,
                          seed=args.seed, rank=dist_info.rank, eval_every_epochs=args.eval_every_epochs,
                          ema_eval=args.model_ema_eval, description=description)
    if not start.run.resuming and stage.bad_images.files:
        check_val_files(val, stage)
    loop = Loop(run_settings(args, steps_per_epoch), stage=stage, loader=loader, optimisation=opt,
                dist_info=dist_info, device=device, prepare=to_channels_last if args.channels_last else None)
    loop.resume(start.run)
    return loop.run()
