"""The tools that show FCMAE learns: reconstruction grids, the collapse monitor (and its pretraining logs),
kNN evaluation and the linear probe. CPU, the tiny test variant, 32-64 px inputs, a few hundred Fashion-MNIST images."""
import csv
import json
import math
import os
import time

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from fcmae.pretrain import knn
from fcmae.pretrain.monitor import collapse_scalars, collapse_stats
from fcmae.runtime.checkpoint_file import read_checkpoint
from fcmae.runtime.weights import timm_encoder
from finetune.cli import run as finetune
from finetune.loss import WithLoss
from finetune.model import LinearProbe, create_classifier
from finetune.options import parse_args
from models import create_fcmae
from models.convert import to_canonical
from fcmae.tools.convert import save_converted
from tests.conftest import FAST_FINETUNE, TINY
from fcmae.tools import knn_eval, visualize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = FAST_FINETUNE
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def encoder_only(tmp_path_factory, pretrain_run):
    """The same weights converted to the reference MinkowskiEngine layout (decoder kept) and to timm (none)."""
    out = tmp_path_factory.mktemp("converted")
    name, _, state = to_canonical(read_checkpoint(pretrain_run[1]))
    save_converted(name, state, "reference", str(out / "reference.pth"))
    save_converted(name, state, "timm", str(out / "timm.pth"))
    return str(out / "reference.pth"), str(out / "timm.pth")


def _error(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return e.value.code, err[-1] if err else ""


# --------------------------------------------------------------------------------------------------
# Collapse monitor


def _images(n=4, size=64, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_monitor_counts_dead_channels_exactly():
    """fc1 bias -100 on chosen channels: GELU(-100 + O(1)) is 0, so exactly those channels are dead. The test
    variant's MLP is 1x1 convs as atto's (channels on dim 1); tiny's is Linear on NHWC (channels last)."""
    torch.manual_seed(0)
    model = create_fcmae(TINY)
    fresh = collapse_stats(model.encoder, _images())
    assert max(fresh["dead_fraction"]) < 0.01, fresh
    with torch.no_grad():
        for block in model.encoder.stages[1].blocks:  # every block of stage 1: 32 of 128 hidden channels each
            block.mlp.fc1.bias[:32] = -100.0
        model.encoder.stages[2].blocks[1].mlp.fc1.bias[100:164] = -100.0  # 64 of 192 in one of 2 blocks
    model.train()
    stats = collapse_stats(model.encoder, _images())
    assert model.training and model.encoder.training  # the mode is restored
    assert stats["dead_fraction"] == pytest.approx([0.0, 0.25, 64 / 192 / 2, 0.0], abs=1e-12)

    tiny = timm.create_model("convnextv2_tiny").eval()
    with torch.no_grad():
        tiny.stages[3].blocks[0].mlp.fc1.bias[:300] = -100.0  # 300 of 3072, one of 3 blocks
    stats = collapse_stats(tiny, _images(4, 64))
    assert not tiny.training
    assert stats["dead_fraction"] == pytest.approx([0.0, 0.0, 0.0, 300 / 3072 / 3], abs=1e-12)


def test_monitor_grn_norms():
    """gamma = j + 1 and beta = -2 in every channel of block j: ||gamma|| = (j + 1) sqrt(4C), ||beta|| = 2 sqrt(4C),
    averaged over a stage's blocks."""
    model = create_fcmae(TINY)
    with torch.no_grad():
        for stage in model.encoder.stages:
            for j, block in enumerate(stage.blocks):
                block.mlp.grn.weight.fill_(j + 1.0)
                block.mlp.grn.bias.fill_(-2.0)
    stats = collapse_stats(model.encoder, _images(2))
    depths, hidden = (1, 1, 2, 1), (96, 128, 192, 256)
    assert stats["gamma_norm"] == pytest.approx([math.sqrt(h) * (d + 1) / 2 for d, h in zip(depths, hidden)])
    assert stats["beta_norm"] == pytest.approx([2 * math.sqrt(h) for h in hidden])
    tags = collapse_scalars(stats)
    assert len(tags) == 12 and tags["grn/stage2_gamma_norm"] == stats["gamma_norm"][2]
    assert tags["collapse/stage3_dead_fraction"] == stats["dead_fraction"][3]


def test_pretraining_logs_the_monitor(pretrain_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = pretrain_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(metrics["collapse"]) == sorted(
        [f"collapse/stage{i}_dead_fraction" for i in range(4)] + [f"grn/stage{i}_{n}_norm" for i in range(4)
                                                                  for n in ("gamma", "beta")])
    assert all(metrics["collapse"][f"grn/stage{i}_gamma_norm"] > 0 for i in range(4))  # Adam moved GRN off zero
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert "collapse/stage2_dead_fraction" in events.Tags()["scalars"]
    assert events.Scalars("grn/stage3_beta_norm")[-1].step == 2
    assert "collapse: dead MLP channels per stage" in (out / "log.txt").read_text()


# --------------------------------------------------------------------------------------------------
# Reconstruction grid


def test_visualize_grid(tmp_path, pretrain_run, encoder_only):
    _, ckpt = pretrain_run
    argv = ["--num", "3", "--input-size", "64", "--seed", "5"]
    done = visualize.run([ckpt, "--out", str(tmp_path / "a.png")] + argv)
    assert done["images"] == 3 and done["norm_pix_loss"] and done["mask_ratio"] == 0.6 and done["decoder_dim"] == 64
    grid = np.asarray(Image.open(tmp_path / "a.png").convert("RGB")).astype(int)
    assert grid.shape == (3 * 66 + 2, 3 * 66 + 2, 3)  # make_grid: 3 columns of 64 px, 2 px padding
    tiles = [[grid[2 + 66 * r: 66 * (r + 1), 2 + 66 * c: 66 * (c + 1)] for c in range(3)] for r in range(3)]
    for original, masked, recon in tiles:
        hidden = (masked == 128).all(axis=-1).reshape(2, 32, 2, 32).all(axis=(1, 3))  # grey (0.5 -> 128) cells
        assert (~hidden).sum() == 1  # int(4 x 0.4) visible patch of 4
        visible = np.kron(~hidden, np.ones((32, 32), dtype=bool))
        assert np.array_equal(masked[visible], original[visible])
        assert np.array_equal(recon[visible], original[visible])  # visible patches pasted back
        assert not np.array_equal(recon[~visible], original[~visible])
    # deterministic for a seed; the reference layout of the same weights draws the same picture
    visualize.run([ckpt, "--out", str(tmp_path / "b.png")] + argv)
    visualize.run([encoder_only[0], "--out", str(tmp_path / "c.png")] + argv)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes() == (tmp_path / "c.png").read_bytes()
    visualize.run([ckpt, "--out", str(tmp_path / "d.png"), "--num", "3", "--seed", "6"])  # input size: checkpoint's
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "d.png").read_bytes()


def test_visualize_errors(tmp_path, pretrain_run, encoder_only, capsys):
    ckpt, out = pretrain_run[1], ["--out", str(tmp_path / "g.png")]
    cases = [
        ([str(tmp_path / "missing.pth")] + out, "checkpoint not found"),
        ([encoder_only[1]] + out, "encoder-only or fine-tuning checkpoint"),
        ([ckpt, "--input-size", "100"] + out, "not divisible by the patch size 32"),
        ([ckpt, "--input-size", "32"] + out, "leaves no visible patch"),
    ]
    for argv, message in cases:
        code, line = _error(visualize.main, argv, capsys)
        assert code == 2 and line.startswith("error: ") and message in line, (argv, line)
    assert not (tmp_path / "g.png").exists()


# --------------------------------------------------------------------------------------------------
# kNN


@pytest.mark.parametrize("backend", ["sparse", "dense", "naive"])
def test_all_visible_map_equals_the_dense_pass(backend):
    """The kNN monitor's fast features: the sparse backend with every cell visible gives timm's dense forward,
    whatever backend the encoder trains with."""
    from models.encoder import SparseConvNeXtV2
    from tests.conftest import randomize_grn

    torch.manual_seed(0)
    encoder = randomize_grn(SparseConvNeXtV2(TINY, backend=backend, in_chans=2), std=0.1).eval()
    images = torch.randn(3, 2, 64, 96)
    with torch.no_grad():
        fast, dense = knn.all_visible_map(encoder)(images), knn.dense_encoder_map(encoder)(images)
    assert fast.shape == dense.shape == (3, 64, 2, 3)
    assert torch.allclose(fast, dense, rtol=1e-4, atol=1e-5)


def test_knn_scores_by_hand():
    """Train: e1 (class 0), e2 and (e1+e2)/sqrt2 (class 1), -e1 (class 2). Query e1 with k=3: neighbours e1 (sim
    1), the diagonal (0.707), e2 (0). T=0.5: class 0 scores e^2 = 7.39, class 1 e^1.414 + e^0 = 5.11, so class 0
    wins; at T=10 the two class-1 votes win (1.105 vs 2.073). A majority vote would say class 1 at any T."""
    s = 2 ** -0.5
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [s, s], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    scores = knn.knn_scores(train, labels, query, num_classes=3, k=3, temperature=0.5)
    # query -e1: sims 1 (-e1), 0 (e2), -0.707 (diagonal)
    expected = torch.tensor([[math.exp(2), math.exp(2 * s) + 1, 0.0], [0.0, 1 + math.exp(-2 * s), math.exp(2)]])
    assert torch.allclose(scores, expected, rtol=1e-6)
    assert knn.topk_accuracy(scores, torch.tensor([0, 2]), ks=(1, 2)) == {"acc1": 100.0, "acc2": 100.0}
    warm = knn.knn_scores(train, labels, query[:1], num_classes=3, k=3, temperature=10.0)
    assert warm.argmax().item() == 1
    assert knn.topk_accuracy(warm, torch.tensor([0]), ks=(1, 2)) == {"acc1": 0.0, "acc2": 100.0}
    # chunking changes nothing; k larger than the training set uses all of it
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    b = torch.nn.functional.normalize(torch.randn(23, 8, generator=g), dim=1)
    la = torch.randint(0, 4, (50,), generator=g)
    assert torch.allclose(knn.knn_scores(a, la, b, 4, k=7, chunk=5), knn.knn_scores(a, la, b, 4, k=7))
    every = knn.knn_scores(a, la, b, 4, k=500, temperature=1.0)
    assert torch.allclose(every.sum(dim=1), (b @ a.T).exp().sum(dim=1), rtol=1e-5)


def test_knn_eval_end_to_end(tmp_path, pretrain_run):
    _, ckpt = pretrain_run
    name, encoder = timm_encoder(ckpt)
    saved = read_checkpoint(ckpt)["model"]
    assert name == TINY
    for key, value in encoder.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(value, saved["encoder." + key]), key
    result = knn_eval.run([ckpt, "--input-size", "32", "--train-subset", "300", "--val-subset", "100",
                           "--num-workers", "0", "--batch-size", "64", "--json", str(tmp_path / "knn.json")])
    assert json.loads((tmp_path / "knn.json").read_text()) == result
    assert result["train_images"] == 300 and result["val_images"] == 100 and result["k"] == 20
    assert 30.0 < result["acc1"] <= result["acc5"] <= 100.0, result  # 10 classes: chance is 10%


# --------------------------------------------------------------------------------------------------
# Linear probe


def test_probe_defaults_and_precedence():
    args = parse_args(["--linear-probe", "--smoothing", "0.1"])
    assert (args.mixup, args.cutmix, args.aa, args.reprob, args.drop_path, args.weight_decay, args.layer_decay,
            args.model_ema, args.blr) == (0.0, 0.0, "none", 0.0, 0.0, 0.0, 1.0, False, 4e-2)
    assert args.smoothing == 0.1  # an explicit flag wins
    config = ["-c", os.path.join(ROOT, "configs", "finetune", "convnextv2_tiny.yaml")]
    assert parse_args(config).mixup == 0.8
    probe = parse_args(config + ["--linear-probe"])
    assert probe.mixup == 0.0 and probe.epochs == 300  # probe defaults over the config's, the rest kept
    assert not parse_args([]).linear_probe and parse_args([]).drop_path == 0.1


def test_linear_probe_module():
    """Frozen encoder in eval mode (drop-path off even when the model is in train mode), gradients only in
    the head, and a step markedly cheaper than a fine-tuning step."""
    torch.manual_seed(0)
    model = create_classifier(TINY, 10, drop_path=0.5)
    probe = LinearProbe(model).train()
    x = _images(4, 32)
    logits = probe(x)
    assert not model.stages.training and model.head.training
    model.eval()
    assert torch.equal(logits, model(x))
    logits.sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == name.startswith("head."), name

    def step_seconds(net, params):
        opt = torch.optim.AdamW(params, lr=1e-3)
        images, labels = _images(32, 64), torch.arange(32) % 10
        best = float("inf")
        for _ in range(3):
            opt.zero_grad()
            t0 = time.perf_counter()
            net(images, labels)[0].backward()
            opt.step()
            best = min(best, time.perf_counter() - t0)
        return best

    full = create_classifier(TINY, 10, drop_path=0.0)
    probed = LinearProbe(create_classifier(TINY, 10, drop_path=0.0))
    loss = torch.nn.CrossEntropyLoss()
    t_full = step_seconds(WithLoss(full, loss), full.parameters())
    t_probe = step_seconds(WithLoss(probed, loss), [p for p in probed.parameters() if p.requires_grad])
    assert t_probe < 0.6 * t_full, (t_probe, t_full)


def test_linear_probe_run(tmp_path, pretrain_run):
    """From a pretraining checkpoint: the encoder stays bit-identical, the head learns, the loss falls, only the
    head is in the optimiser, and --eval on the probe checkpoint reproduces the logged accuracy."""
    _, ckpt = pretrain_run
    out = tmp_path / "probe"
    metrics = finetune(FAST + ["--finetune", ckpt, "--linear-probe", "--train-subset", "320", "--epochs", "2",
                               "--lr", "1e-2", "--output-dir", str(out)])
    assert metrics["steps"] == 20
    assert metrics["mean_last_10"] < metrics["first_loss"] - 0.1, metrics
    state = read_checkpoint(str(out / "checkpoint-00000020.pth"))
    encoder = {k[len("encoder."):]: v for k, v in read_checkpoint(ckpt)["model"].items() if k.startswith("encoder.")}
    head = {k: v for k, v in state["model"].items() if k.startswith("head.")}
    assert set(state["model"]) == set(encoder) | set(head)
    for key, value in encoder.items():
        assert torch.equal(state["model"][key], value), key
    assert not torch.equal(head["head.norm.weight"], torch.ones(64)) and head["head.norm.bias"].any()
    assert head["head.fc.bias"].any() and head["head.fc.weight"].std() > 1e-3  # initialised at std 2e-5
    assert len(state["optimizer"]["state"]) == 4  # head.norm weight/bias, head.fc weight/bias
    assert state["args"]["linear_probe"] and state["model_ema"] is None
    assert "linear probe: encoder frozen" in (out / "log.txt").read_text()
    with open(out / "summary.csv") as f:
        last = list(csv.DictReader(f))[-1]
    result = finetune(FAST + ["--eval", "--resume", str(out / "checkpoint-00000020.pth")])
    assert result["images"] == 200
    assert result["acc1"] == pytest.approx(float(last["acc1"]), abs=1e-9) == metrics["acc1"]
    assert result["acc1"] > 20.0  # chance is 10%


def test_image_folders(tmp_path, pretrain_run):
    """--data-path: kNN on train/ and val/ class folders (dark vs bright images: every neighbour agrees), and
    the reconstruction grid from a folder of images."""
    rng = np.random.default_rng(0)
    for split, n in [("train", 12), ("val", 4)]:
        for c, level in [("dark", 30), ("bright", 220)]:
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(level + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / c / f"{i}.png")
    _, ckpt = pretrain_run
    result = knn_eval.knn_eval(ckpt, data_path=str(tmp_path), input_size=32, k=5, num_workers=0)
    assert (result["train_images"], result["val_images"], result["acc1"]) == (24, 8, 100.0)
    done = visualize.run([ckpt, "--data-path", str(tmp_path / "val"), "--num", "2", "--out", str(tmp_path / "g.png")])
    assert done["images"] == 2 and Image.open(tmp_path / "g.png").size == (3 * 66 + 2, 2 * 66 + 2)
