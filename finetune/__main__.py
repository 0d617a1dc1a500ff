"""Fine-tuning of ConvNeXt V2 for classification: `python -m finetune --finetune PRETRAIN.pth ...`
(console script `fcmae-finetune`). Parse, validate, build, then run the shared training loop (fcmae/loop.py);
`--eval` evaluates a checkpoint and exits.

Image to loss: finetune/data.py (datasets, timm transforms) -> timm's ConvNeXt V2 (finetune/model.py) ->
mixup + criterion (finetune/engine.py) -> fcmae/engine.py (one optimiser step) -> fcmae/loop.py, with
finetune/stage.py for the EMA, evaluation and the best checkpoint.
"""
import copy
import logging

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

from fcmae.cli import exit_with
from fcmae.data import resolve_mean_std
from fcmae.distributed import cleanup, device_for, init_distributed, world_size_from_env
from fcmae.errors import CheckpointError, UsageError
from fcmae.images import BadImageMonitor
from fcmae.logs import setup_logging
from fcmae.loop import Loop, LoopConfig, check_same_settings, find_start, prepare_output
from fcmae.optim import cosine_schedule, effective_lr, epoch_steps
from fcmae.options import plain
from fcmae.sampling import EpochSampler, SeededDataset
from models.ablations import remove_grn
from models.convert import in_chans_of
from models.variants import get_variant

from .data import build_datasets, check_channel_options
from .engine import WithLoss, evaluate
from .layer_decay import build_optimizer
from .model import LinearProbe, create_classifier, init_from_pretrained, read_pretrained
from .options import DEFAULT_MODEL, parse_args, probe_settings, validate
from .stage import FORMAT, FinetuneStage, seed_all

log = logging.getLogger("fcmae")

FIXED = ("model", "in_chans", "nb_classes", "encoder_grn")
# options that only say how or how far to run, not what is computed: free to change between a run and its resume
RUN_ONLY = {"config", "resume", "overwrite", "output_dir", "eval", "max_steps", "num_workers", "log_every",
            "save_every_steps", "keep_checkpoints", "device", "finetune", "bad_image", "max_bad_fraction",
            "eval_every_epochs", "epochs", "compile"}


def run(argv=None) -> dict:
    """Parse, check, then train (returns metrics.json's content) or evaluate (returns the accuracies)."""
    args = parse_args(argv)
    validate(args)
    check_channel_options(args.in_chans, args.aa, args.color_jitter)
    resolve_mean_std(args.in_chans, args.mean, args.std)  # wrong lists stop us before any data is read
    if args.eval:
        dist_info = init_distributed(args.device)
        try:
            return evaluate_checkpoint(args, dist_info)
        finally:
            cleanup()
    # Everything that reads user input (checkpoints, data) comes before anything is written or a group joined.
    start = starting_point(args)
    data = datasets(args)
    resolve_classes(args, data.classes, start[3])
    steps_per_epoch = epoch_steps(len(data.train), args.batch_size, args.accum_iter, world_size_from_env())
    dist_info = init_distributed(args.device)
    try:
        return train(args, dist_info, start, data, steps_per_epoch)
    finally:
        cleanup()


def main(argv=None):
    """Console entry point: exit code 0, or 2 with a one-line `error: ...` for bad input."""
    exit_with(run, argv)


def datasets(args, train: bool = True):
    return build_datasets(data_path=args.data_path, input_size=args.input_size, in_chans=args.in_chans,
                          mean=args.mean, std=args.std, aa=args.aa, reprob=args.reprob, color_jitter=args.color_jitter,
                          train_subset=args.train_subset if train else None,
                          label_fraction=args.label_fraction if train else None, val_subset=args.val_subset,
                          seed=args.seed, bad_image=args.bad_image, max_bad_fraction=args.max_bad_fraction,
                          val_split=args.val_split if train else None)


def resolve_model(args, found: str, source: str):
    """--model, else the checkpoint's variant, else the default; a checkpoint of another variant is an error."""
    if args.model and found and args.model != found:
        raise CheckpointError(f"{source} holds {found}, but --model is {args.model}")
    args.model = args.model or found or DEFAULT_MODEL


def resolve_classes(args, classes, head_classes):
    """--nb-classes, else the size of the checkpoint head being kept, else the number of classes in the data."""
    if args.nb_classes is None:
        args.nb_classes = head_classes or len(classes)
    elif head_classes and args.nb_classes != head_classes:
        raise CheckpointError(f"the checkpoint's head has {head_classes} classes, but --nb-classes is {args.nb_classes}")
    if args.nb_classes < len(classes):
        raise UsageError(f"the data has {len(classes)} classes but the classifier has {args.nb_classes} outputs")


def check_in_chans(found: int, args, source: str):
    if found != args.in_chans:
        raise CheckpointError(f"{source} takes {found} input channels but --in-chans is {args.in_chans}; adapt it "
                              f"with python -m tools.convert {source} OUT --to ours --in-chans {args.in_chans}")


def val_loader(dataset, args, dist_info):
    # every process a disjoint shard, no padding: the summed counts are exact
    shard = list(range(dist_info.rank, len(dataset), dist_info.world_size))
    return DataLoader(dataset, batch_size=args.batch_size, sampler=shard, num_workers=args.num_workers,
                      generator=torch.Generator())  # its own generator: evaluating leaves the training RNG alone


def to_channels_last(images, targets):
    return images.contiguous(memory_format=torch.channels_last), targets


def check_val_files(loader, stage):
    """Read every validation file once before training, so too many unreadable ones stop the run now, not after
    the first training epoch (the monitor logs each bad file and raises past the limit)."""
    log.info("checking the %d validation images", len(loader.sampler))
    for _ in loader:
        pass
    stage.poll_data()


def load_state(model, state_dict, what: str):
    try:
        model.load_state_dict(state_dict)  # strict: every tensor must match
    except RuntimeError as e:
        raise CheckpointError(f"{what} does not fit the model: {' '.join(str(e).split())[:300]}") from None


# --------------------------------------------------------------------------------------------------
# Evaluation only


def evaluate_checkpoint(args, dist_info) -> dict:
    setup_logging(None, dist_info.is_main)
    device = device_for(args.device, dist_info)
    # an explicit --resume CKPT wins over --finetune, so `-c RUN/config.yaml --resume RUN/checkpoint-best.pth`
    # evaluates that checkpoint although the run's config names the checkpoint it started from
    if args.finetune and args.resume in ("auto", "none"):  # any layout the converter reads, with its head
        source, state = args.finetune, None
        name, weights = read_pretrained(args.finetune, args.model)
        if "head.fc.weight" not in weights:
            raise CheckpointError(f"{args.finetune} has no classifier head (a pretraining checkpoint?): "
                                  "fine-tune it first, then evaluate the result")
        check_in_chans(in_chans_of(weights), args, source)
        head = weights["head.fc.weight"].shape[0]
    else:
        source, state = find_start(args.output_dir, args.resume if args.resume != "none" else "auto", True, FORMAT,
                                   "a fine-tuning checkpoint")
        if state is None:
            raise UsageError(f"--eval: no checkpoint in {args.output_dir}; pass --resume CKPT or --finetune CKPT")
        name, head = state["model_name"], state["args"]["nb_classes"]
        check_in_chans(state["args"].get("in_chans", 3), args, source)
        trained_at = tuple(state["args"]["input_size"])
        if trained_at != tuple(args.input_size):
            log.warning("evaluating at %s, but %s was trained at %s (pass --input-size, or -c its config.yaml)",
                        args.input_size, source, trained_at)
    resolve_model(args, name, source)
    data = datasets(args, train=False)
    resolve_classes(args, data.classes, head)
    model = create_classifier(args.model, args.nb_classes, 0.0, args.in_chans)
    if state is None:
        init_from_pretrained(model, weights, keep_head=True)
    else:
        load_state(model, state["model"], source)
    bad_images = BadImageMonitor(data.val)  # before the loader's workers start
    loader = val_loader(data.val, args, dist_info)
    results = evaluate(model.to(device), loader, device, args.amp)
    if state is not None and state.get("model_ema") is not None:
        ema = copy.deepcopy(model)
        load_state(ema, state["model_ema"], f"{source} (model_ema)")
        results["ema"] = evaluate(ema, loader, device, args.amp)
    bad_images.poll()  # logs skipped val files; too many void the result
    log.info("%s on %d images: top-1 %.3f top-5 %.3f loss %.4f%s", source, results["images"], results["acc1"],
             results["acc5"], results["loss"], f" (EMA top-1 {results['ema']['acc1']:.3f})" if "ema" in results else "")
    return results


# --------------------------------------------------------------------------------------------------
# Training


def build_criterion(args):
    """Mixup/CutMix (which also smooths the labels) with soft-target CE, else label-smoothing CE."""
    if args.mixup > 0 or args.cutmix > 0:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=1.0, switch_prob=0.5, mode="batch",
                      label_smoothing=args.smoothing, num_classes=args.nb_classes)
        return mixup, SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return None, torch.nn.CrossEntropyLoss()


def starting_point(args):
    """(resume path, resume state, pretrained timm state dict, classes of a head to keep, warning about changed
    settings): a checkpoint in
    --output-dir (or --resume) continues a run and wins over --finetune, which starts one."""
    path, state = find_start(args.output_dir, args.resume, args.overwrite, FORMAT,
                             "a fine-tuning checkpoint (start from it with --finetune instead)")
    if state is not None:
        resolve_model(args, state["model_name"], path)
        changed = check_same_settings(state["args"], plain(args) | {"nb_classes": state["args"].get("nb_classes")},
                                      path, FIXED, RUN_ONLY)
        return path, state, None, state["args"]["nb_classes"], changed
    if args.finetune:
        name, pretrained = read_pretrained(args.finetune, args.model)
        resolve_model(args, name, args.finetune)
        check_in_chans(in_chans_of(pretrained), args, args.finetune)
        keep = args.keep_head and "head.fc.weight" in pretrained
        return None, None, pretrained, pretrained["head.fc.weight"].shape[0] if keep else None, None
    resolve_model(args, None, "")
    return None, None, None, None, None


def train(args, dist_info, start, data, steps_per_epoch) -> dict:
    device = device_for(args.device, dist_info)
    path, state, pretrained, _, changed = start
    prepare_output(args.output_dir, dist_info, overwrite_fresh=args.overwrite and state is None, warning=changed)
    seed_all(args.seed)  # the same initial weights on every process (and so in the EMA copy each one makes)
    model = create_classifier(args.model, args.nb_classes, args.drop_path, args.in_chans)
    if pretrained is not None:
        init_from_pretrained(model, pretrained, args.keep_head)
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
    net = WithLoss(LinearProbe(model) if args.linear_probe else model, criterion)
    if dist_info.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[dist_info.local_rank] if device.type == "cuda" else None)
    if args.compile:
        net = torch.compile(net)
    eff_batch, lr = effective_lr(args.batch_size, args.accum_iter, dist_info.world_size, args.blr, args.lr)
    log.info("effective batch %d = %d x %d accumulation x %d processes; lr %.3e, layer decay %s %.2f", eff_batch,
             args.batch_size, args.accum_iter, dist_info.world_size, lr, args.layer_decay_type, args.layer_decay)
    optimizer = build_optimizer(model, get_variant(args.model).depths, lr, args.weight_decay, args.layer_decay,
                                args.layer_decay_type, device.type)
    scheduler = cosine_schedule(optimizer, args.epochs, steps_per_epoch, args.warmup_epochs, args.min_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    train_set = SeededDataset(data.train, seed=args.seed)
    sampler = EpochSampler(len(train_set), seed=args.seed, rank=dist_info.rank, world_size=dist_info.world_size)
    held_out = " held out from the training set (--val-split)" if args.val_split else ""
    description = (f"fine-tuning {args.model} on {len(train_set)} images ({args.nb_classes} classes, {len(data.val)} "
                   f"val images{held_out}) of {args.in_chans} channels at {'x'.join(map(str, args.input_size))}: "
                   f"{steps_per_epoch} steps/epoch")
    if args.linear_probe:
        description += ("; linear probe: encoder frozen (eval mode, no gradients), head.norm + head.fc trained; "
                        + probe_settings(args))
    val = val_loader(data.val, args, dist_info)
    stage = FinetuneStage(model, net, ema, mixup_fn, data.train, data.val, val, device, args.amp, args.seed,
                          dist_info.rank, args.eval_every_epochs, args.model_ema_eval, data.classes, args.output_dir,
                          dist_info.is_main, description)
    if state is None and stage.bad_images.files:
        check_val_files(val, stage)
    cfg = LoopConfig(output_dir=args.output_dir, model_name=args.model, epochs=args.epochs,
                     steps_per_epoch=steps_per_epoch, batch_size=args.batch_size, accum_iter=args.accum_iter,
                     max_steps=args.max_steps, amp=args.amp, clip_grad=args.clip_grad, num_workers=args.num_workers,
                     save_every_steps=args.save_every_steps, keep_checkpoints=args.keep_checkpoints,
                     log_every=args.log_every, skip_nonfinite=args.skip_nonfinite, args=plain(args))
    loop = Loop(cfg, dist_info, device, train_set, sampler, stage, optimizer, scheduler, scaler,
                prepare=to_channels_last if args.channels_last else None)
    if state is not None:
        loop.resume(state, path)
    return loop.run()


if __name__ == "__main__":
    main()
