"""k-nearest-neighbour evaluation of a pretrained encoder (DINO's weighted kNN classifier), no training.

    python -m fcmae.tools.knn_eval CKPT [--data-path DIR | --dataset fashion-mnist] [--input-size 32] [--k 20]
        [--temperature 0.07] [--train-subset N | --label-fraction F] [--val-subset N] [--batch-size 256]
        [--in-chans C --mean ... --std ...] [--json PATH]

Features: the encoder weights of any checkpoint the converter reads, in timm's dense ConvNeXt V2 (its input
channels read from the checkpoint); the final-stage map averaged over H and W, L2-normalised; the maths in
fcmae/pretrain/knn.py (also behind the kNN monitor of pretraining). Data: Fashion-MNIST train/test, or --data-path with
train/ and val/ class folders, through fine-tuning's eval transform, with its seeded class-stratified subsets
(--val-subset draws the same images as fine-tuning's). Bad input: one `error:` line, exit code 2.
"""
import json
import os
from typing import Optional

import torch

from fcmae.data.labelled import build_datasets
from fcmae.pretrain.knn import knn_evaluate, pooled_features
from fcmae.runtime.cli import check_output_file, exit_with
from fcmae.runtime.errors import UsageError
from fcmae.runtime.options import DEVICE_HELP, ArgParser, Device, Float, Int, Str, add, parse_with_config
from fcmae.runtime.options import input_size as parse_input_size
from fcmae.runtime.weights import timm_encoder


def knn_eval(checkpoint, data_path: Optional[str] = None, input_size=(32, 32), k: int = 20,
             temperature: float = 0.07, train_subset: Optional[int] = None, label_fraction: Optional[float] = None,
             val_subset: Optional[int] = None, batch_size: int = 256, num_workers: int = 2, device: str = "cpu",
             seed: int = 0, model_name: Optional[str] = None, use_ema: bool = False, mean=None, std=None) -> dict:
    """kNN top-1/top-5 (%) of the checkpoint's encoder on the val (Fashion-MNIST: test) images."""
    name, model = timm_encoder(checkpoint, model_name, use_ema)
    in_chans = model.stem[0].in_channels
    size = parse_input_size(input_size)
    data = build_datasets(data_path=data_path, input_size=size, in_chans=in_chans, mean=mean, std=std,
                          train_subset=train_subset, label_fraction=label_fraction, val_subset=val_subset, seed=seed,
                          augment=False)
    device = torch.device(device)
    model.to(device)
    result = knn_evaluate(pooled_features(model.forward_features), data.train, data.val, len(data.classes), device,
                          k=k, temperature=temperature, batch_size=batch_size, num_workers=num_workers)
    return {"checkpoint": os.fspath(checkpoint), "model": name, "in_chans": in_chans, "input_size": list(size), "k": k,
            "temperature": temperature, "train_images": result["bank_images"], "val_images": result["query_images"],
            "acc1": result["acc1"], "acc5": result["acc5"]}


def build_parser() -> ArgParser:
    p = ArgParser(prog="python -m fcmae.tools.knn_eval", description=__doc__.split("\n\n")[0])
    add(p, "-c", "--config", default=None, help="YAML file of option defaults")
    p.add_argument("checkpoint",
                   help="any checkpoint the converter reads (pretraining, fine-tuning, timm, reference, HF)")
    add(p, "--model", kind=Str(optional=True), default=None,
        help="variant; checked against the checkpoint (inferred when omitted)")
    add(p, "--ema", action="store_true", help="use a fine-tuning checkpoint's model_ema weights")
    add(p, "--dataset", kind=Str(["fashion-mnist"]), default="fashion-mnist",
        help="built-in dataset (train split as neighbours, test split evaluated), used without --data-path")
    add(p, "--data-path", "--data-dir", kind=Str(optional=True), default=None, metavar="PATH",
        help="folder with train/<class>/* and val/<class>/* images")
    add(p, "--input-size", kind=Int(min=32), nargs="+", default=[32], help="32 (square) or 'H W'")
    add(p, "--mean", kind=Float(), nargs="+", default=None, help="per-channel mean (default: by channel count)")
    add(p, "--std", kind=Float(min=0, open_min=True), nargs="+", default=None, help="per-channel std")
    add(p, "--k", kind=Int(min=1), default=20, help="neighbours that vote")
    add(p, "--temperature", kind=Float(min=0, open_min=True), default=0.07, help="vote weight exp(similarity / T)")
    add(p, "--train-subset", kind=Int(min=1), default=None, help="neighbours from a seeded, class-stratified subset")
    add(p, "--label-fraction", kind=Float(min=0, max=1, open_min=True), default=None,
        help="... or from that fraction of the training images")
    add(p, "--val-subset", kind=Int(min=1), default=None, help="evaluate a seeded, class-stratified subset of N")
    add(p, "-b", "--batch-size", kind=Int(min=1), default=256, help="images per feature-extraction batch")
    add(p, "-j", "--num-workers", "--workers", kind=Int(min=0), default=2, help="DataLoader worker processes")
    add(p, "--device", kind=Device(), default=None, help=DEVICE_HELP)
    add(p, "--seed", kind=Int(min=0), default=0, help="picks the subsets")
    add(p, "--json", kind=Str(optional=True), default=None, help="also write the result to this JSON file")
    return p


def run(argv=None) -> dict:
    args = parse_with_config(build_parser(), argv)
    if args.train_subset is not None and args.label_fraction is not None:
        raise UsageError("give --train-subset or --label-fraction, not both")
    if not os.path.exists(args.checkpoint):
        raise UsageError(f"checkpoint not found: {args.checkpoint}")
    if args.json:
        check_output_file(args.json, "--json")
    result = knn_eval(args.checkpoint, args.data_path, args.input_size, args.k, args.temperature, args.train_subset,
                      args.label_fraction, args.val_subset, args.batch_size, args.num_workers, args.device, args.seed,
                      args.model, args.ema, args.mean, args.std)
    print(f"{args.checkpoint} ({result['model']}): kNN k={args.k} T={args.temperature} on {result['val_images']} "
          f"images ({result['train_images']} neighbours): top-1 {result['acc1']:.2f} top-5 {result['acc5']:.2f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


def main(argv=None):
    exit_with(run, argv)


if __name__ == "__main__":
    main()
