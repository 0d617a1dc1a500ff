"""Evaluation: top-1/top-5 and loss over a validation set (every epoch during fine-tuning, or `--eval` of a
checkpoint), exact under DDP."""
import copy
import logging

import torch
import torch.distributed as dist
from timm.utils import accuracy
from torch import nn
from torch.utils.data import DataLoader

from fcmae.data.bad_samples import BadImageMonitor
from fcmae.runtime.distributed import all_reduce_mean, device_for
from fcmae.runtime.errors import CheckpointError, UsageError
from fcmae.runtime.logs import setup_logging
from fcmae.runtime.run_start import find_start
from fcmae.runtime.signals import ignore_stop_signals
from fcmae.runtime.step import autocast
from fcmae.runtime.weights import read_timm_weights
from models.convert import in_chans_of

from .model import create_classifier, init_from_pretrained
from .options import START_RULES
from .start import check_in_chans, load_state, resolve_classes, resolve_model

log = logging.getLogger("fcmae")


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: str = "none") -> dict:
    """Top-1/top-5 (%) and cross-entropy over every image of the loader's shards, summed across processes
    (each process sees a disjoint shard, so the result is exact, with no padded duplicates)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss sum, images
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        acc1, acc5 = accuracy(logits, labels, topk=(1, min(5, logits.shape[1])))
        n = labels.shape[0]
        totals += torch.tensor([round(acc1.item() * n / 100), round(acc5.item() * n / 100),
                                nn.functional.cross_entropy(logits, labels, reduction="sum").item(), n],
                               dtype=torch.float64, device=device)
    model.train(was_training)
    # the mean over processes of each sum is the total / world size; the ratios below are unaffected
    correct1, correct5, loss, count = all_reduce_mean(totals).tolist()
    count = max(count, 1e-12)
    return {"acc1": 100.0 * correct1 / count, "acc5": 100.0 * correct5 / count, "loss": loss / count,
            "images": round(count * (dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1))}


def val_loader(dataset, batch_size: int, num_workers: int, dist_info) -> DataLoader:
    # every process a disjoint shard, no padding: the summed counts are exact
    shard = list(range(dist_info.rank, len(dataset), dist_info.world_size))
    return DataLoader(dataset, batch_size=batch_size, sampler=shard, num_workers=num_workers,
                      generator=torch.Generator(),  # its own generator: evaluating leaves the training RNG alone
                      worker_init_fn=ignore_stop_signals)


def evaluate_checkpoint(args, dist_info, datasets) -> dict:
    """`--eval`: the --resume checkpoint if given, else the --finetune one (any layout, with its head), else the
    newest in --output-dir, on the validation set; `datasets(args, train=False)` gives the data."""
    setup_logging(None, dist_info.is_main)
    device = device_for(args.device, dist_info)
    # an explicit --resume CKPT wins over --finetune, so `-c RUN/config.yaml --resume RUN/checkpoint-best.pth`
    # evaluates that checkpoint although the run's config names the checkpoint it started from
    if args.finetune and args.resume in ("auto", "none"):  # any layout the converter reads, with its head
        source, state = args.finetune, None
        name, weights = read_timm_weights(args.finetune, args.model)
        if "head.fc.weight" not in weights:
            raise CheckpointError(f"{args.finetune} has no classifier head (a pretraining checkpoint?): "
                                  "fine-tune it first, then evaluate the result")
        check_in_chans(in_chans_of(weights), args, source)
        head = weights["head.fc.weight"].shape[0]
    else:
        start = find_start(args.output_dir, args.resume if args.resume != "none" else "auto", True, START_RULES)
        if not start.resuming:
            raise UsageError(f"--eval: no checkpoint in {args.output_dir}; pass --resume CKPT or --finetune CKPT")
        source, state = start.path, start.state
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
    loader = val_loader(data.val, args.batch_size, args.num_workers, dist_info)
    results = evaluate(model.to(device), loader, device, args.amp)
    if state is not None and state.get("model_ema") is not None:
        ema = copy.deepcopy(model)
        load_state(ema, state["model_ema"], f"{source} (model_ema)")
        results["ema"] = evaluate(ema, loader, device, args.amp)
    bad_images.poll()  # logs skipped val files; too many void the result
    log.info("%s on %d images: top-1 %.3f top-5 %.3f loss %.4f%s", source, results["images"], results["acc1"],
             results["acc5"], results["loss"], f" (EMA top-1 {results['ema']['acc1']:.3f})" if "ema" in results else "")
    return results
