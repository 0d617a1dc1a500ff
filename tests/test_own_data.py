"""Data as users bring it, end to end: 4-band 16-bit TIFF tiles and 13-band float .npy arrays -> per-channel
statistics (fcmae.tools.data_stats) -> FCMAE pretraining with --in-chans C -> conversion to timm -> a strict load into
timm.create_model(..., in_chans=C) -> fine-tuning from the checkpoint; and fine-tuning from tar shards."""
import numpy as np
import pytest
import tifffile
import timm
import torch
import yaml
from safetensors.torch import load_file

from fcmae.pretrain.cli import main as pretrain
from fcmae.runtime.checkpoint_file import read_checkpoint
from finetune.cli import run as finetune
from fcmae.tools.convert import main as convert
from fcmae.tools.data_stats import main as data_stats
from tests.conftest import TINY, TINY_PRETRAIN

pytestmark = pytest.mark.usefixtures("one_thread")
RNG = np.random.default_rng(0)


def tile(c: int, kind: str, label: int) -> np.ndarray:
    """A smooth random (H, W, C) tile whose brightness depends on the class, so the classes differ."""
    base = RNG.random((8, 8, c)).repeat(8, 0).repeat(8, 1) + 0.3 * label
    if kind == "uint16":
        return (base * 20000).astype(np.uint16)
    return (base * 3.0 - 1.0).astype(np.float32)


def make_folder(root, c: int, kind: str, per_class: int = 6):
    for split in ("train", "val"):
        for label, cls in enumerate(("crop", "forest")):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                a = tile(c, kind, label)
                if kind == "uint16":
                    tifffile.imwrite(root / split / cls / f"{i}.tif", a, photometric="minisblack", planarconfig="contig")
                else:
                    np.save(root / split / cls / f"{i}.npy", a)
    return root


@pytest.mark.parametrize("c,kind", [(4, "uint16"), (13, "float32")])
def test_pretrain_convert_timm_finetune(tmp_path, c, kind, capsys):
    data = make_folder(tmp_path / "data", c, kind)
    stats = tmp_path / "stats.yaml"
    with pytest.raises(SystemExit) as e:
        data_stats([str(data / "train"), "--in-chans", str(c), "--out", str(stats), "--num-workers", "0"])
    assert e.value.code == 0
    values = yaml.safe_load(stats.read_text())
    assert values["in-chans"] == c and len(values["mean"]) == len(values["std"]) == c

    out = tmp_path / "pre"
    metrics = pretrain(TINY_PRETRAIN + ["-c", str(stats), "--data-path", str(data / "train"), "--input-size", "64",
                                        "--batch-size", "4", "--max-steps", "3", "--epochs", "1", "--warmup-epochs",
                                        "0", "--lr", "1e-3", "--num-workers", "0", "--knn-every-epochs", "0",
                                        "--output-dir", str(out)])
    assert metrics["complete"] and metrics["steps"] == 3
    ckpt = out / "checkpoint-00000003.pth"
    state = read_checkpoint(ckpt)
    assert state["args"]["in_chans"] == c and state["model"]["encoder.stem.0.weight"].shape[1] == c
    assert state["model"]["pred.weight"].shape[0] == 32 * 32 * c

    assert convert([str(ckpt), str(tmp_path / "enc.safetensors"), "--to", "timm"]) == 0
    model = timm.create_model(TINY, num_classes=0, in_chans=c)
    result = model.load_state_dict(load_file(tmp_path / "enc.safetensors"), strict=False)
    # every encoder tensor loads; only the final norm (absent from a pretraining checkpoint) stays at its init
    assert sorted(result.missing_keys) == ["head.norm.bias", "head.norm.weight"] and not result.unexpected_keys
    assert torch.equal(model.stem[0].weight, state["model"]["encoder.stem.0.weight"])

    ft = finetune(["--finetune", str(ckpt), "--data-path", str(data), "--in-chans", str(c), "--mean",
                   *map(str, values["mean"]), "--std", *map(str, values["std"]), "--input-size", "64",
                   "--batch-size", "4", "--max-steps", "2", "--epochs", "1", "--aa", "none", "--num-workers", "0",
                   "--no-model-ema", "--output-dir", str(tmp_path / "ft")])
    assert ft["complete"] and ft["steps"] == 2 and ft["acc1"] is not None
    # fine-tuning with another channel count than the checkpoint's is refused, naming both
    with pytest.raises(SystemExit) as e:
        from finetune.cli import main as finetune_main
        finetune_main(["--finetune", str(ckpt), "--data-path", str(data), "--in-chans", "3", "--aa", "none",
                       "--input-size", "64", "--output-dir", str(tmp_path / "wrong")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"takes {c} input channels but --in-chans is 3" in err


def test_finetune_from_tar_shards(tmp_path):
    from PIL import Image

    from fcmae.tools.make_shards import main as make_shards

    root = tmp_path / "photos"
    for split in ("train", "val"):
        for label, cls in enumerate(("dark", "light")):
            (root / split / cls).mkdir(parents=True)
            for i in range(6):
                img = RNG.integers(0, 100, (40, 40, 3)) + 120 * label
                Image.fromarray(img.astype(np.uint8)).save(root / split / cls / f"{i}.png")
    for split in ("train", "val"):
        with pytest.raises(SystemExit) as e:
            make_shards([str(root / split), str(tmp_path / "shards" / split), "--prefix", split])
        assert e.value.code == 0
    common = ["--model", TINY, "--input-size", "32", "--batch-size", "4", "--max-steps", "3", "--epochs", "1",
              "--aa", "none", "--reprob", "0", "--num-workers", "0", "--no-model-ema", "--seed", "3"]
    from_shards = finetune(common + ["--data-path", str(tmp_path / "shards"), "--output-dir", str(tmp_path / "a")])
    from_folder = finetune(common + ["--data-path", str(root), "--output-dir", str(tmp_path / "b")])
    # the same samples in the same seeded order: the same run
    for key in ("first_loss", "last_loss", "acc1", "acc5"):
        assert from_shards[key] == from_folder[key], key
