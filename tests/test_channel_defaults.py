"""Defaults that fit the data (issue 22, item 5), statistics checked in the dtype used (issue 23, item 5) and a
run without timm's scheduler warning (issue 23, item 6).

A recipe or default augmentation that assumes 8-bit RGB is replaced for other images, and the log says so; the
same value typed on the command line is refused. `python -m finetune --in-chans 4 --data-path ... --finetune CKPT`
with nothing else (but the small-run flags and the normalisation 4 channels need) runs.
"""
import logging
import os

import numpy as np
import pytest
import torch

from fcmae.data.labelled import build_datasets
from fcmae.data.normalization import HIGH_BIT_DEPTH, resolve_mean_std
from fcmae.data.transforms import check_channel_options
from fcmae.pretrain.cli import main as pretrain_main
from fcmae.runtime.errors import UsageError
from fcmae.runtime.optim import cosine_schedule
from finetune.cli import run as finetune_run
from finetune.options import parse_args
from tests.conftest import TINY_PRETRAIN

pytestmark = pytest.mark.usefixtures("one_thread")
MEAN_STD = ["--mean", "0.5", "0.5", "0.5", "0.5", "--std", "0.3", "0.3", "0.3", "0.3"]
REPLACED = "--in-chans 4: RandAugment's colour operations assume RGB; using RandomAffine("


def npy_folders(root, channels: int, dtype, classes=("a", "b"), n=3):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            os.makedirs(root / split / c)
            for i in range(n):
                a = rng.integers(0, 255, (32, 32, channels)).astype(dtype)
                np.save(root / split / c / f"{i}.npy", a / 255 if dtype == np.float32 else a)
    return root


@pytest.fixture(scope="module")
def four_bands(tmp_path_factory):
    """(folder of 4-channel .npy images in train/ and val/ class folders, a 2-step 4-channel FCMAE checkpoint)."""
    root = tmp_path_factory.mktemp("four")
    npy_folders(root / "data", 4, np.uint8)
    pretrain_main(TINY_PRETRAIN + ["--in-chans", "4", "--data-path", str(root / "data" / "train"), "--input-size",
                                   "64", "--batch-size", "3", "--max-steps", "2", "--warmup-epochs", "0",
                                   "--num-workers", "0", "--knn-every-epochs", "0", "--output-dir", str(root / "pre")]
                  + MEAN_STD)
    return root / "data", str(root / "pre" / "checkpoint-00000002.pth")


def test_finetune_four_channels_with_the_default_recipe(four_bands, tmp_path):
    data, ckpt = four_bands
    out = tmp_path / "ft"
    result = finetune_run(["--in-chans", "4", "--data-path", str(data), "--finetune", ckpt, "--input-size", "32",
                           "--batch-size", "4", "--max-steps", "2", "--num-workers", "0", "--output-dir", str(out)]
                          + MEAN_STD)
    assert result["complete"] and result["steps"] == 2
    assert REPLACED in (out / "log.txt").read_text()  # logged after the output folder opened: in the run's log


def test_typed_policy_is_refused_for_four_channels(four_bands, tmp_path):
    data, ckpt = four_bands
    with pytest.raises(UsageError, match=r"^RandAugment's colour operations assume RGB; pass --aa none for "
                                         r"--in-chans 4$"):
        finetune_run(["--in-chans", "4", "--data-path", str(data), "--finetune", ckpt, "--aa",
                      "rand-m9-mstd0.5-inc1", "--output-dir", str(tmp_path / "ft")] + MEAN_STD)
    assert not (tmp_path / "ft").exists()
    with pytest.raises(UsageError, match="leave out --color-jitter for --in-chans 4"):
        finetune_run(["--in-chans", "4", "--data-path", str(data), "--color-jitter", "0.4",
                      "--output-dir", str(tmp_path / "ft")] + MEAN_STD)


def test_recipe_values_are_replaced_not_refused(tmp_path):
    """A recipe's RandAugment and colour jitter are not typed: for --in-chans 1 they are replaced."""
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text("aa: rand-m7-mstd0.5\ncolor-jitter: 0.4\n")
    args = parse_args(["-c", str(cfg), "--in-chans", "1"])
    replaced = check_channel_options(args.in_chans, args.aa, args.color_jitter, typed=args.typed)
    assert replaced[0].startswith("--in-chans 1: RandAugment's colour operations assume RGB; using RandomAffine("
                                  "degrees=[-21.0, 21.0], translate=(0.315, 0.315)")
    assert replaced[1] == "--in-chans 1: colour jitter assumes RGB; --color-jitter 0.4 left out"
    with pytest.raises(UsageError, match="--aa none"):
        check_channel_options(1, args.aa, None, typed=args.typed | {"aa"})


def test_high_bit_depth_rgb_gets_the_geometric_part(tmp_path):
    """float32 RGB (the data reveals its kind once opened): the default policy becomes RandomAffine on tensors."""
    root = npy_folders(tmp_path / "hb", 3, np.float32)
    options = dict(data_path=str(root), input_size=(32, 32), in_chans=3, mean=[0.5] * 3, std=[0.3] * 3,
                   aa="rand-m9-mstd0.5-inc1", seed=0)
    data = build_datasets(**options, typed=frozenset())
    assert data.replaced and data.replaced[0].startswith("16-bit or float images: RandAugment's colour operations "
                                                         "assume 8-bit RGB; using RandomAffine(")
    tensor_pipeline = [type(t).__name__ for t in data.train.transform.tensor.transforms]
    assert tensor_pipeline[:4] == ["AsTensor", "RandomResizedCrop", "RandomHorizontalFlip", "RandomApply"]
    image, _ = data.train[0]
    assert image.shape == (3, 32, 32) and torch.isfinite(image).all()
    with pytest.raises(UsageError, match="pass --aa none for 16-bit or float images"):
        build_datasets(**options, typed=frozenset({"aa"}))
    assert check_channel_options(3, "rand-m9-mstd0.5-inc1", kind=HIGH_BIT_DEPTH, typed=frozenset()) != []


@pytest.mark.parametrize("mean,std,option", [
    ([0.5], [1e-300], "--std"),  # 0 in float32
    ([0.5], [1e-39], "--std"),  # subnormal in float32
    ([1e300], [0.2], "--mean"),  # inf in float32
    ([0.5], [1e39], "--std"),
])
def test_statistics_are_checked_in_float32(mean, std, option):
    with pytest.raises(UsageError, match=f"^{option} .*float32"):
        resolve_mean_std(1, mean, std)
    assert resolve_mean_std(1, [0.5], [1e-37]) == ((0.5,), (1e-37,))  # small, but normal in float32


def test_data_stats_refuses_constant_images(tmp_path, capsys):
    from PIL import Image

    from fcmae.tools.data_stats import main

    for i in range(3):  # red varies, green is 7 and blue 0 in every pixel
        Image.new("RGB", (16, 16), (i * 50, 7, 0)).save(tmp_path / f"{i}.png")
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), "--in-chans", "3", "--num-workers", "0", "--out", str(tmp_path / "out" / "s.yaml")])
    captured = capsys.readouterr()
    assert e.value.code == 2 and not (tmp_path / "out").exists() and "std" not in captured.out
    line = captured.err.strip().splitlines()[-1]
    assert line.startswith("error: ") and "channels 1, 2 of --in-chans 3 have the same value" in line


def test_one_step_cosine_part_gives_no_timm_warning(caplog):
    """--epochs 1 under a longer warm-up: the cosine part is one step; timm warned on each such run."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    with caplog.at_level(logging.WARNING):
        scheduler = cosine_schedule(opt, epochs=1, steps_per_epoch=3, warmup_epochs=40, min_lr=0.0)
    assert not [r for r in caplog.records if r.name.startswith("timm")], caplog.text
    lrs = []
    for step in range(3):
        scheduler.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == [0.0, 0.5, 1.0]  # warm-up over 2 steps, then the base lr (as with a 1-step cosine part)
