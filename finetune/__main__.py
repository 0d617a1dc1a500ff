"""Fine-tuning of ConvNeXt V2 for classification: `python -m finetune --finetune PRETRAIN.pth ...`
(console script `fcmae-finetune`).

Image to loss: finetune/data.py (datasets, timm transforms) -> timm's ConvNeXt V2 (finetune/model.py) ->
mixup + criterion (finetune/engine.py) -> fcmae/engine.py (one optimiser step). This file wires them up,
evaluates, logs and checkpoints. `--eval` evaluates a checkpoint and exits.
"""
import copy
import logging
import os
import random
import sys
import time
from functools import partial

import numpy as np
import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from fcmae import checkpoint as ckpt
from fcmae.cli import run_cli, setup_logging
from fcmae.config import UsageError, to_yaml
from fcmae.data import EpochSampler, SeededDataset
from fcmae.distributed import all_reduce_mean, cleanup, init_distributed, world_size_from_env
from fcmae.engine import NonFiniteGuard, channels_last, train_step
from fcmae.images import BadImageMonitor
from fcmae.pretrain import StopRequest, build_scheduler, epoch_steps
from fcmae.progress import Progress
from models.convert import CheckpointError, read_checkpoint
from models.variants import get_variant

from .data import build_datasets
from .engine import WithLoss, evaluate, mix
from .layer_decay import param_groups
from .model import LinearProbe, create_classifier, init_from_pretrained, read_pretrained
from .options import DEFAULT_MODEL, parse_args, probe_settings, validate
from .report import final_metrics, log_scalars, summary_row, write_metrics, write_summary

log = logging.getLogger("fcmae")
FORMAT = "fcmae-finetune"


def run(argv=None) -> dict:
    """Parse, check, then train (returns metrics.json's content) or evaluate (returns the accuracies)."""
    args = parse_args(argv)
    validate(args)
    if args.eval:
        dist_info = init_distributed(args.device)
        try:
            return evaluate_checkpoint(args, dist_info)
        finally:
            cleanup()
    # Everything that reads user input (checkpoints, data) comes before anything is written or a group joined.
    start = starting_point(args)
    data = build_datasets(args)
    resolve_classes(args, data.classes, start[3])
    epoch_steps(len(data.train), args, world_size_from_env())
    dist_info = init_distributed(args.device)
    try:
        return train(args, dist_info, start, data)
    finally:
        cleanup()


def main(argv=None):
    """Console entry point: exit code 0, or 2 with a one-line `error: ...` for bad input."""
    sys.exit(run_cli(run, argv))


# --------------------------------------------------------------------------------------------------
# Set-up shared by training and evaluation


def device_of(args, dist_info) -> torch.device:
    if args.device.startswith("cuda") and dist_info.enabled:
        return torch.device(f"cuda:{dist_info.local_rank}")
    return torch.device(args.device)


def seed_all(*key: int):
    """Seed torch (drop-path), numpy (mixup) and python from a tuple of ints such as (seed, rank, step)."""
    seed = int(np.random.SeedSequence(list(key)).generate_state(1)[0])
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def find_resume(args):
    """(path, state) of the fine-tuning checkpoint to continue from, or (None, None)."""
    if args.resume == "none":
        return None, None
    if args.resume == "auto":
        path, state = ckpt.latest_loadable(args.output_dir)
    else:
        path, state = args.resume, read_checkpoint(args.resume)
    if state is not None and (not isinstance(state, dict) or state.get("format") != FORMAT):
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a fine-tuning checkpoint (format {found!r}); "
                              "start from it with --finetune instead")
    return path, state


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
        raise CheckpointError(f"the checkpoint's head has {head_classes} classes, "
                              f"but --nb-classes is {args.nb_classes}")
    if args.nb_classes < len(classes):
        raise UsageError(f"the data has {len(classes)} classes but the classifier has {args.nb_classes} outputs")


def val_loader(dataset, args, dist_info):
    # every process a disjoint shard, no padding: the summed counts are exact
    shard = list(range(dist_info.rank, len(dataset), dist_info.world_size))
    return DataLoader(dataset, batch_size=args.batch_size, sampler=shard, num_workers=args.num_workers,
                      generator=torch.Generator())  # its own generator: evaluating leaves the training RNG alone


def load_state(model, state_dict, what: str):
    try:
        model.load_state_dict(state_dict)  # strict: every tensor must match
    except RuntimeError as e:
        raise CheckpointError(f"{what} does not fit the model: {' '.join(str(e).split())[:300]}") from None


def plain_args(args) -> dict:
    return vars(args) | {"input_size": list(args.input_size)}


# options that only say how or how far to run, not what is computed: free to change between a run and its resume
RUN_ONLY = {"config", "resume", "output_dir", "eval", "max_steps", "num_workers", "log_every", "save_every_steps",
            "keep_checkpoints", "device", "finetune", "bad_image", "max_bad_fraction", "eval_every_epochs"}


def warn_changed_args(saved: dict, args):
    """A resumed run continues exactly only with the settings it was started with: name the ones that differ."""
    now = plain_args(args)
    changed = sorted(k for k in (set(saved) | set(now)) - RUN_ONLY if saved.get(k) != now.get(k))
    if changed:
        log.warning("resuming with changed settings (the run will not match an uninterrupted one): %s",
                    ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in changed))


# --------------------------------------------------------------------------------------------------
# Evaluation only


def evaluate_checkpoint(args, dist_info) -> dict:
    setup_logging(None, dist_info.is_main)
    device = device_of(args, dist_info)
    # an explicit --resume CKPT wins over --finetune, so `-c RUN/config.yaml --resume RUN/checkpoint-best.pth`
    # evaluates that checkpoint although the run's config names the checkpoint it started from
    if args.finetune and args.resume in ("auto", "none"):  # any layout the converter reads, with its head
        source, state = args.finetune, None
        name, weights = read_pretrained(args.finetune, args.model)
        if "head.fc.weight" not in weights:
            raise CheckpointError(f"{args.finetune} has no classifier head (a pretraining checkpoint?): "
                                  "fine-tune it first, then evaluate the result")
        head = weights["head.fc.weight"].shape[0]
    else:
        source, state = find_resume(args)
        if state is None:
            raise UsageError(f"--eval: no checkpoint in {args.output_dir}; pass --resume CKPT or --finetune CKPT")
        name, head = state["model_name"], state["args"]["nb_classes"]
        trained_at = tuple(state["args"]["input_size"])
        if trained_at != tuple(args.input_size):
            log.warning("evaluating at %s, but %s was trained at %s (pass --input-size, or -c its config.yaml)",
                        args.input_size, source, trained_at)
    resolve_model(args, name, source)
    data = build_datasets(args, train=False)
    resolve_classes(args, data.classes, head)
    model = create_classifier(args.model, args.nb_classes, 0.0)
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


def build_optimizer(model, args, world_size):
    eff_batch = args.batch_size * args.accum_iter * world_size
    if args.lr is None:
        args.lr = args.blr * eff_batch / 256
    log.info("effective batch %d = %d x %d accumulation x %d processes; lr %.3e, layer decay %s %.2f", eff_batch,
             args.batch_size, args.accum_iter, world_size, args.lr, args.layer_decay_type, args.layer_decay)
    groups = partial(param_groups, depths=get_variant(args.model).depths, weight_decay=args.weight_decay,
                     layer_decay=args.layer_decay, layer_decay_type=args.layer_decay_type)
    return create_optimizer_v2(model, "adamw", lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999),
                               param_group_fn=groups)


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
    """(resume path, resume state, pretrained timm state dict, classes of a head to keep): a checkpoint in
    --output-dir (or --resume) continues a run and wins over --finetune, which starts one."""
    resume_path, state = find_resume(args)
    if state is not None:
        resolve_model(args, state["model_name"], resume_path)
        return resume_path, state, None, state["args"]["nb_classes"]
    if args.finetune:
        name, pretrained = read_pretrained(args.finetune, args.model)
        resolve_model(args, name, args.finetune)
        keep = args.keep_head and "head.fc.weight" in pretrained
        return None, None, pretrained, pretrained["head.fc.weight"].shape[0] if keep else None
    resolve_model(args, None, "")
    return None, None, None, None


def evaluate_epoch(model, ema, val, device, args, epoch: int, step: int, epoch_losses):
    """summary.csv row for the weights (and, with --model-ema-eval, the EMA weights) after `step`."""
    stats = evaluate(model, val, device, args.amp)
    ema_stats = evaluate(ema.module, val, device, args.amp) if ema is not None and args.model_ema_eval else None
    log.info("epoch %d step %d: top-1 %.3f top-5 %.3f val loss %.4f%s", epoch, step, stats["acc1"], stats["acc5"],
             stats["loss"], f" EMA top-1 {ema_stats['acc1']:.3f}" if ema_stats else "")
    return summary_row(epoch, step, sum(epoch_losses) / len(epoch_losses), stats, ema_stats)


def train(args, dist_info, start, data) -> dict:
    device = device_of(args, dist_info)
    resume_path, state, pretrained, _ = start
    seed_all(args.seed)  # the same initial weights on every process (and so in the EMA copy each one makes)
    model = create_classifier(args.model, args.nb_classes, args.drop_path)
    if pretrained is not None:
        init_from_pretrained(model, pretrained, args.keep_head)

    train_set = SeededDataset(data.train, seed=args.seed)
    sampler = EpochSampler(len(train_set), seed=args.seed, rank=dist_info.rank, world_size=dist_info.world_size)
    steps_per_epoch = epoch_steps(len(train_set), args, dist_info.world_size)
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)

    os.makedirs(args.output_dir, exist_ok=True)
    setup_logging(args.output_dir, dist_info.is_main)
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
    optimizer = build_optimizer(model, args, dist_info.world_size)
    scheduler = build_scheduler(optimizer, args, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    step, losses, rows, best = 0, [], [], {"acc1": None, "source": None, "step": None}
    if state is not None:
        load_state(model, state["model"], resume_path)
        if ema is not None and state.get("model_ema") is not None:
            load_state(ema.module, state["model_ema"], f"{resume_path} (model_ema)")
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step, losses, rows, best = state["step"], list(state["losses"]), list(state["history"]), dict(state["best"])
        log.info("resumed from %s at step %d", resume_path, step)
        warn_changed_args(state["args"], args)
    elif pretrained is not None:
        log.info("initialised %s from %s (%s)", args.model, args.finetune,
                 "head kept" if args.keep_head else "head re-initialised, std 2e-5")
    if dist_info.is_main:
        ckpt.remove_stale_temporaries(args.output_dir)
        with open(os.path.join(args.output_dir, "config.yaml"), "w") as f:
            f.write(to_yaml(args))
        if rows:
            write_summary(args.output_dir, rows)
    # purge_step: events a killed run logged after its last checkpoint are dropped, not shown twice
    writer = SummaryWriter(os.path.join(args.output_dir, "tensorboard"), purge_step=step or None) \
        if dist_info.is_main else None
    log.info("fine-tuning %s on %d images (%d classes, %d val images) at %s: %d steps/epoch, %d steps", args.model,
             len(train_set), args.nb_classes, len(data.val), "x".join(map(str, args.input_size)), steps_per_epoch,
             total_steps)
    if args.linear_probe:
        log.info("linear probe: encoder frozen (eval mode, no gradients), head.norm + head.fc trained; %s",
                 probe_settings(args))

    def save(path=None):
        if not dist_info.is_main:
            return
        state = {"format": FORMAT, "model_name": args.model, "model": model.state_dict(),
                 "model_ema": ema.module.state_dict() if ema is not None else None,
                 "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step,
                 "epoch": step // steps_per_epoch, "args": plain_args(args), "rng": ckpt.rng_state(),
                 "best_acc1": best["acc1"], "best": best, "history": rows, "losses": losses, "classes": data.classes}
        if path:
            ckpt.save_or_stop(state, path)
        else:
            path = ckpt.save_training_state(args.output_dir, step, state, args.keep_checkpoints)
        log.info("saved %s", path)

    stop = StopRequest()
    guard = NonFiniteGuard(args.skip_nonfinite)
    bad_images = BadImageMonitor(data.train, data.val)
    progress = Progress(total_steps, step, args.log_every)
    loader_kwargs = dict(batch_size=args.batch_size, num_workers=args.num_workers, drop_last=True,
                         pin_memory=device.type == "cuda")
    val = val_loader(data.val, args, dist_info)
    while step < total_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        train_set.set_epoch(epoch)
        sampler.set_epoch(epoch, start=done_in_epoch * args.accum_iter * args.batch_size)
        batches = iter(DataLoader(train_set, sampler=sampler, generator=torch.Generator(), **loader_kwargs))
        for _ in range(done_in_epoch, steps_per_epoch):
            micro = [next(batches) for _ in range(args.accum_iter)]
            bad_images.poll()  # logs newly skipped files; too many stop the run before this step
            # Each step's mixup and drop-path draws depend on (seed, rank, step) only, like the augmentation on
            # (seed, epoch, index): a resumed run repeats an uninterrupted one exactly, on any number of
            # processes (the checkpoint's "rng" holds only rank 0's state, so it is not restored).
            seed_all(args.seed, dist_info.rank, step)
            micro = mix(micro, mixup_fn)
            if args.channels_last:
                micro = channels_last(micro)
            scheduler.step_update(step)
            t0 = time.time()
            loss, grad_norm = train_step(net, micro, optimizer, scaler, device, args.amp, args.clip_grad)
            step += 1
            loss = all_reduce_mean(torch.tensor(loss, device=device)).item()
            guard.check(step, loss, grad_norm, args.amp)
            if ema is not None:
                ema.update(model)
            losses.append(loss)
            lr = max(g["lr"] for g in optimizer.param_groups)  # the head's (scale 1) lr
            progress.update(step, epoch, loss, lr, grad_norm, args.batch_size * args.accum_iter * dist_info.world_size)
            if writer is not None:
                writer.add_scalar("train/loss", loss, step)
                writer.add_scalar("train/lr", lr, step)
                writer.add_scalar("train/grad_norm", grad_norm, step)
                writer.add_scalar("train/step_seconds", time.time() - t0, step)
            if stop.signal or step == total_steps or (args.save_every_steps and step % args.save_every_steps == 0):
                break
        epochs_done = step // steps_per_epoch if step % steps_per_epoch == 0 else None
        if step == total_steps or (epochs_done and epochs_done % args.eval_every_epochs == 0):
            # evaluate every --eval-every-epochs epochs, and where the run (or a --max-steps run) ends
            rows.append(evaluate_epoch(model, ema, val, device, args, epoch, step,
                                       losses[epoch * steps_per_epoch:]))
            bad_images.poll()  # too many unreadable val files: stop before the results are saved
            row = rows[-1]
            log_scalars(writer, row)
            # the best checkpoint holds both weights, so it is chosen by whichever of the two scored higher
            ema_acc = row["ema_acc1"]
            acc, source = (ema_acc, "ema") if ema_acc is not None and ema_acc > row["acc1"] else (row["acc1"], "model")
            if best["acc1"] is None or acc > best["acc1"]:
                best = {"acc1": acc, "source": source, "step": step}
                save(os.path.join(args.output_dir, "checkpoint-best.pth"))
            if dist_info.is_main:
                write_summary(args.output_dir, rows)
        save()
        if stop.signal:
            log.info("received %s: checkpoint saved at step %d, exiting", stop.signal, step)
            break
    if writer is not None:
        writer.close()
    metrics = final_metrics(args.model, step, losses, rows, best)
    if dist_info.is_main:
        write_metrics(args.output_dir, metrics)
        log.info("done: top-1 %s, best %s (%s at step %s)", metrics["acc1"], metrics["best_acc1"],
                 metrics["best_source"], metrics["best_step"])
    return metrics


if __name__ == "__main__":
    main()
