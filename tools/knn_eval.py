"""k-nearest-neighbour evaluation of a pretrained encoder (DINO's weighted kNN classifier), no training.

    python -m tools.knn_eval CKPT [--data-path DIR | --dataset fashion-mnist] [--input-size 32] [--k 20]
        [--temperature 0.07] [--train-subset N | --label-fraction F] [--val-subset N] [--batch-size 256]
        [--json PATH]

Features: the encoder weights of any checkpoint the converter reads, in timm's dense ConvNeXt V2; the
final-stage feature map averaged over H and W (no head), L2-normalised. Each val image's class scores are
score_c = sum over its k most cosine-similar training images i of class c of exp(sim_i / T); top-1 and top-5
are read off those scores. Data: Fashion-MNIST train/test, or --data-path with train/ and val/ class folders,
both through fine-tuning's eval transform, with its seeded class-stratified subsets (--val-subset draws the
same images as fine-tuning's). Bad input: one `error:` line, exit code 2.
"""
import json
import os
import sys
from typing import Optional, Sequence

import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from fcmae.cli import check_writable_dir, run_cli
from fcmae.config import ArgParser, UsageError, add, input_size as parse_input_size
from finetune.data import build_datasets
from finetune.options import build_parser as finetune_parser
from models.convert import load_encoder_weights, load_into_timm


def knn_scores(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, num_classes: int,
               k: int = 20, temperature: float = 0.07, chunk: int = 256) -> torch.Tensor:
    """(N_test, num_classes) class scores from L2-normalised features: for each test feature, the k training
    features of highest cosine similarity vote for their class with weight exp(sim / temperature).
    Test features go `chunk` at a time, so at most chunk x N_train similarities exist at once."""
    k = min(k, len(train_feats))
    scores = torch.zeros(len(test_feats), num_classes, dtype=torch.float32, device=test_feats.device)
    for start in range(0, len(test_feats), chunk):
        sim = test_feats[start:start + chunk] @ train_feats.T  # cosine similarity: the features are unit length
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = (top_sim.float() / temperature).exp()
        scores[start:start + chunk].scatter_add_(1, train_labels[top_idx], votes)
    return scores


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict:
    """{"acc1": %, "acc5": %}: the label is among the k highest scores (k capped at the number of classes)."""
    ranked = scores.argsort(dim=1, descending=True, stable=True)
    hits = ranked == labels[:, None]
    return {f"acc{k}": 100.0 * hits[:, :min(k, scores.shape[1])].any(dim=1).sum().item() / len(labels) for k in ks}


def encoder_from_checkpoint(path, model_name: Optional[str] = None, use_ema: bool = False):
    """(variant, timm's ConvNeXt V2 without a classifier, its stem and stages loaded strictly from the checkpoint)."""
    name, weights = load_encoder_weights(path, model_name=model_name, use_ema=use_ema)
    model = timm.create_model(name, pretrained=False, num_classes=0)
    load_into_timm(model, weights, keep_head=False)
    return name, model.eval()


@torch.no_grad()
def extract_features(model: torch.nn.Module, loader, device) -> tuple:
    """(features (N, C) float32, L2-normalised global-average-pooled final-stage maps; labels (N,))."""
    model.eval().to(device)
    feats, labels = [], []
    for images, targets in loader:
        maps = model.forward_features(images.to(device, non_blocking=True))
        feats.append(F.normalize(maps.float().mean(dim=(2, 3)), dim=1))
        labels.append(targets.to(device))
    return torch.cat(feats), torch.cat(labels)


def knn_eval(checkpoint, data_path: Optional[str] = None, input_size=(32, 32), k: int = 20,
             temperature: float = 0.07, train_subset: Optional[int] = None, label_fraction: Optional[float] = None,
             val_subset: Optional[int] = None, batch_size: int = 256, num_workers: int = 2, device: str = "cpu",
             seed: int = 0, model_name: Optional[str] = None, use_ema: bool = False) -> dict:
    """kNN top-1/top-5 (%) of the checkpoint's encoder on the val (Fashion-MNIST: test) images."""
    name, model = encoder_from_checkpoint(checkpoint, model_name, use_ema)
    data_args = finetune_parser().parse_args([])  # fine-tuning's data options at their defaults (bad files, ...)
    vars(data_args).update(data_path=data_path, input_size=parse_input_size(input_size), train_subset=train_subset,
                           label_fraction=label_fraction, val_subset=val_subset, seed=seed)
    data = build_datasets(data_args, augment=False)
    device = torch.device(device)
    loaders = [DataLoader(ds, batch_size=batch_size, num_workers=num_workers, shuffle=False)
               for ds in (data.train, data.val)]
    (train_feats, train_labels), (val_feats, val_labels) = (extract_features(model, dl, device) for dl in loaders)
    scores = knn_scores(train_feats, train_labels, val_feats, len(data.classes), k, temperature)
    return {"checkpoint": os.fspath(checkpoint), "model": name,
            "input_size": list(data_args.input_size), "k": k, "temperature": temperature,
            "train_images": len(train_feats), "val_images": len(val_feats),
            **topk_accuracy(scores, val_labels)}


def build_parser() -> ArgParser:
    p = ArgParser(prog="python -m tools.knn_eval", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint",
                   help="any checkpoint the converter reads (pretraining, fine-tuning, timm, reference, HF)")
    add(p, "--model", default=None, help="variant; checked against the checkpoint (inferred when omitted)")
    add(p, "--ema", action="store_true", help="use a fine-tuning checkpoint's model_ema weights")
    add(p, "--dataset", default="fashion-mnist", choices=["fashion-mnist"],
        help="built-in dataset (train split as neighbours, test split evaluated), used without --data-path")
    add(p, "--data-path", default=None, help="folder with train/<class>/* and val/<class>/* images")
    add(p, "--input-size", type=int, nargs="+", default=[32], help="32 (square) or 'H W'")
    add(p, "--k", type=int, default=20, help="neighbours that vote")
    add(p, "--temperature", type=float, default=0.07, help="vote weight exp(similarity / T)")
    add(p, "--train-subset", type=int, default=None, help="neighbours from a seeded, class-stratified subset of N")
    add(p, "--label-fraction", type=float, default=None, help="... or from that fraction of the training images")
    add(p, "--val-subset", type=int, default=None, help="evaluate a seeded, class-stratified subset of N images")
    add(p, "--batch-size", type=int, default=256, help="images per feature-extraction batch")
    add(p, "--num-workers", type=int, default=2)
    add(p, "--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add(p, "--seed", type=int, default=0, help="picks the subsets")
    add(p, "--json", default=None, help="also write the result to this JSON file")
    return p


def run(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        args.input_size = parse_input_size(args.input_size)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if min(args.input_size) < 32:
        raise UsageError(f"--input-size must be at least 32 (the network's total stride), got {args.input_size}")
    for name in ("k", "batch_size", "train_subset", "val_subset"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_workers < 0:
        raise UsageError(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.temperature <= 0:
        raise UsageError(f"--temperature must be > 0, got {args.temperature}")
    if args.train_subset is not None and args.label_fraction is not None:
        raise UsageError("give --train-subset or --label-fraction, not both")
    if args.label_fraction is not None and not 0 < args.label_fraction <= 1:
        raise UsageError(f"--label-fraction must be in (0, 1], got {args.label_fraction}")
    if not os.path.exists(args.checkpoint):
        raise UsageError(f"checkpoint not found: {args.checkpoint}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device} requested but CUDA is not available; use --device cpu")
    if args.json:
        check_writable_dir(os.path.dirname(os.path.abspath(args.json)))
    result = knn_eval(args.checkpoint, args.data_path, args.input_size, args.k, args.temperature, args.train_subset,
                      args.label_fraction, args.val_subset, args.batch_size, args.num_workers, args.device, args.seed,
                      args.model, args.ema)
    print(f"{args.checkpoint} ({result['model']}): kNN k={args.k} T={args.temperature} on {result['val_images']} "
          f"images ({result['train_images']} neighbours): top-1 {result['acc1']:.2f} top-5 {result['acc5']:.2f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


def main(argv=None):
    sys.exit(run_cli(run, argv))


if __name__ == "__main__":
    main()
