"""k-nearest-neighbour evaluation of an encoder's features (DINO's weighted kNN classifier), no training.

Features: the encoder's final-stage map averaged over H and W, L2-normalised. Each query image's class scores are
score_c = sum over its k most cosine-similar bank images i of class c of exp(sim_i / T); top-1 and top-5 are read
off those scores. Under DDP every process extracts the features of its shard of the bank and of the queries, the
bank is gathered on every process, and the correct counts are summed: the result equals one process's.
Used by fcmae/tools/knn_eval.py and by the kNN monitor during pretraining.
"""
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from fcmae.runtime.signals import ignore_stop_signals


def knn_scores(bank_feats: torch.Tensor, bank_labels: torch.Tensor, query_feats: torch.Tensor, num_classes: int,
               k: int = 20, temperature: float = 0.07, chunk: int = 256) -> torch.Tensor:
    """(N_query, num_classes) class scores from L2-normalised features: for each query, the k bank features of
    highest cosine similarity vote for their class with weight exp(sim / temperature). Queries go `chunk` at a
    time, so at most chunk x N_bank similarities exist at once."""
    k = min(k, len(bank_feats))
    scores = torch.zeros(len(query_feats), num_classes, dtype=torch.float32, device=query_feats.device)
    for start in range(0, len(query_feats), chunk):
        sim = query_feats[start:start + chunk] @ bank_feats.T  # cosine similarity: the features are unit length
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = (top_sim.float() / temperature).exp()
        scores[start:start + chunk].scatter_add_(1, bank_labels[top_idx], votes)
    return scores


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict:
    """{k: number of queries whose label is among the k highest scores} (k capped at the number of classes)."""
    ranked = scores.argsort(dim=1, descending=True, stable=True)
    hits = ranked == labels[:, None]
    return {k: int(hits[:, :min(k, scores.shape[1])].any(dim=1).sum()) for k in ks}


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict:
    """{"acc1": %, "acc5": %}."""
    return {f"acc{k}": 100.0 * n / len(labels) for k, n in topk_correct(scores, labels, ks).items()}


def pooled_features(stem_and_stages: Callable) -> Callable:
    """images -> L2-normalised global-average-pooled final-stage features, for a function giving the final map."""
    def features(images):
        return F.normalize(stem_and_stages(images).float().mean(dim=(2, 3)), dim=1)
    return features


def dense_encoder_map(encoder: torch.nn.Module) -> Callable:
    """The final-stage map of an encoder owning timm's `stem` and `stages` (our FCMAE encoder or timm's model),
    run densely on the whole image."""
    def forward(images):
        x = encoder.stem(images)
        for stage in encoder.stages:
            x = stage(x)
        return x
    return forward


def all_visible_map(encoder: torch.nn.Module) -> Callable:
    """The final-stage map of our FCMAE encoder (models.encoder.SparseConvNeXtV2, per-image GRN statistics) with
    every cell visible, run by the sparse backend whatever the encoder's own: the dense pass's values (equal to
    float round-off, tested) in less than half its CPU time (atto at 64 px: 1.3 against 3.0 ms an image), as its
    linear layers on site rows beat timm's 1x1 convolutions and LayerNorm2d. Image sides: multiples of 32."""
    from models.backends.sparse import SparseBackend

    backend = SparseBackend()

    def forward(images):
        cells = (images.shape[2] // 32) * (images.shape[3] // 32)
        return backend(encoder, images, images.new_zeros(images.shape[0], cells), cells)
    return forward


def _rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def extract(features: Callable, dataset, device, batch_size: int = 256, num_workers: int = 0):
    """(features (n, C), labels (n,)) of this process's shard of the dataset (every world_size-th image)."""
    rank, world = _rank_world()
    shard = list(range(rank, len(dataset), world))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=shard, num_workers=num_workers,
                        generator=torch.Generator(), worker_init_fn=ignore_stop_signals)
    feats, labels = [], []
    for images, targets in loader:
        feats.append(features(images.to(device, non_blocking=True)))
        labels.append(torch.as_tensor(targets).to(device))
    if not feats:
        return torch.zeros(0, 0, device=device), torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(feats), torch.cat(labels)


def _gather(x: torch.Tensor) -> torch.Tensor:
    """All processes' rows, in rank order (shards may differ in length by one)."""
    rank, world = _rank_world()
    if world == 1:
        return x
    n = torch.tensor([len(x)], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    most = int(max(s.item() for s in sizes))
    padded = torch.zeros((most, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[:len(x)] = x
    out = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[:int(s.item())] for o, s in zip(out, sizes)])


@torch.no_grad()
def knn_evaluate(features: Callable, bank, queries, num_classes: int, device, k: int = 20, temperature: float = 0.07,
                 batch_size: int = 256, num_workers: int = 0) -> dict:
    """kNN top-1/top-5 (%) of `queries` against `bank` (datasets of (image, label)), sharded over processes."""
    bank_feats, bank_labels = extract(features, bank, device, batch_size, num_workers)
    query_feats, query_labels = extract(features, queries, device, batch_size, num_workers)
    bank_feats, bank_labels = _gather(bank_feats), _gather(bank_labels)
    correct = topk_correct(knn_scores(bank_feats, bank_labels, query_feats, num_classes, k, temperature), query_labels)
    totals = torch.tensor([correct[1], correct[5], len(query_labels)], dtype=torch.float64, device=device)
    if _rank_world()[1] > 1:
        dist.all_reduce(totals)
    c1, c5, n = totals.tolist()
    return {"acc1": 100.0 * c1 / max(n, 1), "acc5": 100.0 * c5 / max(n, 1), "bank_images": len(bank_feats),
            "query_images": int(n)}
