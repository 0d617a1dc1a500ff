"""Where a fine-tuning run starts, decided before anything is written: a checkpoint of this run to resume (which
wins), pretrained weights to start from (--finetune, any layout the converter reads), or a random init; and the
variant, input channels and number of classes that follow from it."""
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from fcmae.runtime.errors import CheckpointError, UsageError
from fcmae.runtime.options import plain
from fcmae.runtime.run_start import Start, check_same_settings, find_start
from fcmae.runtime.weights import read_timm_weights
from models.convert import in_chans_of

from .options import DEFAULT_MODEL, START_RULES


@dataclass(frozen=True)
class FinetuneStart:
    """`run`: the checkpoint of this run to resume, if any; `pretrained`: the timm state dict to start from
    (--finetune) when there is none; `head_classes`: the classes of a checkpoint head that is kept."""
    run: Start
    pretrained: Optional[Dict[str, torch.Tensor]] = None
    head_classes: Optional[int] = None


def starting_point(args) -> FinetuneStart:
    """A checkpoint in --output-dir (or --resume) continues a run and wins over --finetune, which starts one;
    sets args.model from the checkpoint when it was not given."""
    start = find_start(args.output_dir, args.resume, args.overwrite, START_RULES)
    if start.resuming:
        saved = start.state["args"]
        resolve_model(args, start.state["model_name"], start.path)
        start = check_same_settings(start, plain(args) | {"nb_classes": saved.get("nb_classes")}, START_RULES)
        return FinetuneStart(start, head_classes=saved["nb_classes"])
    if args.finetune:
        name, pretrained = read_timm_weights(args.finetune, args.model)
        resolve_model(args, name, args.finetune)
        check_in_chans(in_chans_of(pretrained), args, args.finetune)
        keep = args.keep_head and "head.fc.weight" in pretrained
        return FinetuneStart(start, pretrained, pretrained["head.fc.weight"].shape[0] if keep else None)
    resolve_model(args, None, "")
    return FinetuneStart(start)


def resolve_model(args, found: str, source: str):
    """--model, else the checkpoint's variant, else the default; a checkpoint of another variant is an error."""
    if args.model and found and args.model != found:
        raise CheckpointError(f"{source} holds {found}, but --model is {args.model}")
    args.model = args.model or found or DEFAULT_MODEL


def resolve_classes(args, classes, head_classes: Optional[int]):
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
                              f"with python -m fcmae.tools.convert {source} OUT --to ours --in-chans {args.in_chans}")


def load_state(model, state_dict, what: str):
    try:
        model.load_state_dict(state_dict)  # strict: every tensor must match
    except RuntimeError as e:
        raise CheckpointError(f"{what} does not fit the model: {' '.join(str(e).split())[:300]}") from None
