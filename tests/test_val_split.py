"""Fine-tuning's --val-split: a held-out, class-stratified part of the training set (fixed split seed) is the
validation set during training; label subsets come from the rest; the data's own val/ (Fashion-MNIST: the test
set) is not read until --eval."""
import json

import numpy as np
import pytest
from PIL import Image

import fcmae.data
import finetune.data as D
from fcmae.errors import DataError, UsageError
from finetune.__main__ import run
from tests.conftest import FAST_FINETUNE

pytestmark = pytest.mark.usefixtures("one_thread")


def indices(subset):
    return np.asarray(subset.indices)


def test_split_is_stratified_disjoint_and_independent_of_the_seed():
    targets = np.repeat(np.arange(4), [50, 50, 50, 250])
    held, rest = D.split_validation(targets, 40)
    assert len(held) == 40 and np.bincount(targets[held]).tolist() == [5, 5, 5, 25]
    assert not set(held) & set(rest) and sorted(set(held) | set(rest)) == list(range(400))
    again, _ = D.split_validation(targets, 40)
    assert np.array_equal(held, again)  # the split seed is fixed: no --seed goes in
    labelled = [D.labelled_subset(targets, 40, seed, rest) for seed in (0, 1)]
    for lab in labelled:
        assert not set(lab) & set(held) and np.bincount(targets[lab]).tolist() == [5, 5, 5, 25]
    assert not np.array_equal(*labelled)  # the seed draws the labelled images
    with pytest.raises(DataError, match="whole training set"):
        D.split_validation(targets, 400)


@pytest.fixture
def opened(monkeypatch):
    """The Fashion-MNIST splits build_datasets opens."""
    splits = []
    real = D.FashionMNIST

    def spy(split="train", *args, **kwargs):
        splits.append(split)
        return real(split, *args, **kwargs)

    monkeypatch.setattr(D, "FashionMNIST", spy)
    return splits


def test_fashion_mnist_held_out_set_shared_by_seeds_and_test_set_unread(opened):
    common = dict(data_path=None, input_size=(32, 32), in_chans=1, label_fraction=0.01, val_split=6000)
    runs = [D.build_datasets(seed=seed, **common) for seed in (0, 1)]
    assert "val" not in opened and "test" not in opened  # the 10k test images are not opened while training
    targets = fcmae.data.FashionMNIST("train", in_chans=1).targets
    held = indices(runs[0].val)
    assert np.array_equal(held, indices(runs[1].val))  # every --seed evaluates on the same held-out images
    assert len(held) == 6000 and np.bincount(targets[held]).tolist() == [600] * 10
    for data in runs:
        lab = indices(data.train)
        # --label-fraction 0.01 is of the whole 60k training set: 600 images, 60 per class, none held out
        assert len(lab) == 600 and np.bincount(targets[lab]).tolist() == [60] * 10
        assert not set(lab) & set(held)
    assert not np.array_equal(indices(runs[0].train), indices(runs[1].train))
    # the held-out images go through the eval transform, the labelled ones through the training one
    assert runs[0].val.dataset.transform is not runs[0].train.dataset.transform
    img, label = runs[0].val[0]
    assert img.shape == (1, 32, 32) and label == targets[held[0]]
    # without a label subset, training uses all 54000 other images
    rest = D.build_datasets(data_path=None, input_size=(32, 32), in_chans=1, val_split=6000)
    assert len(rest.train) == 54000 and not set(indices(rest.train)) & set(held)
    # evaluation (train=False) reads the test set as before, whatever --val-split says
    evaluated = D.build_datasets(data_path=None, input_size=(32, 32), in_chans=1, val_split=6000, train=False)
    assert opened[-1] == "val" and len(evaluated.val) == 10000


def test_too_few_images_left_for_the_label_subset():
    with pytest.raises(DataError, match="after --val-split"):
        D.build_datasets(data_path=None, input_size=(32, 32), in_chans=1, train_subset=59000, val_split=6000)


def write_folder(root, split, classes, n, seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / split / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")


def test_image_folder_and_shards_carve_from_train_without_val(tmp_path):
    from tools.make_shards import make_shards

    root = tmp_path / "data"
    write_folder(root, "train", ["cat", "dog", "eel"], 10)  # no val/ at all: it must not be needed
    data = D.build_datasets(data_path=str(root), input_size=(32, 32), val_split=6, train_subset=9, seed=3)
    held, lab = indices(data.val), indices(data.train)
    targets = D.targets_of(data.train.dataset)
    assert np.bincount(targets[held]).tolist() == [2, 2, 2] and np.bincount(targets[lab]).tolist() == [3, 3, 3]
    assert not set(held) & set(lab) and data.classes == ["cat", "dog", "eel"]
    assert data.val[0][0].shape == (3, 32, 32)
    with pytest.raises(DataError):  # evaluation still needs val/
        D.build_datasets(data_path=str(root), input_size=(32, 32), val_split=6, train=False)
    # the same from tar shards of train/
    make_shards(str(root / "train"), str(tmp_path / "shards" / "train"), shard_size=20_000, progress=lambda _: None)
    sharded = D.build_datasets(data_path=str(tmp_path / "shards"), input_size=(32, 32), val_split=6, train_subset=9,
                               seed=3)
    assert np.array_equal(indices(sharded.val), held) and np.array_equal(indices(sharded.train), lab)


def test_cli_evaluates_on_the_held_out_set_and_eval_reads_the_test_set(tmp_path, monkeypatch):
    args = [a for a in FAST_FINETUNE if a not in ("--val-subset", "200")]
    with pytest.raises(UsageError, match="--val-split .* or --val-subset"):
        run(FAST_FINETUNE + ["--val-split", "100", "--output-dir", str(tmp_path / "x")])
    opened = []
    real = D.FashionMNIST
    monkeypatch.setattr(D, "FashionMNIST", lambda split="train", *a, **k: opened.append(split) or real(split, *a, **k))
    out = tmp_path / "run"
    metrics = run(args + ["--in-chans", "1", "--val-split", "100", "--train-subset", "64", "--max-steps", "2",
                          "--no-model-ema", "--aa", "none", "--output-dir", str(out)])
    assert opened == ["train", "train"] and metrics["steps"] == 2
    assert "100 val images held out from the training set" in (out / "log.txt").read_text()
    assert "val_split: 100" in (out / "config.yaml").read_text()
    # the final test read: one explicit --eval of checkpoint-best, on (200 of) the test images
    result = run(["--eval", "-c", str(out / "config.yaml"), "--resume", str(out / "checkpoint-best.pth"),
                  "--val-subset", "200"])
    assert opened[-1] == "val" and result["images"] == 200
    assert json.loads((out / "metrics.json").read_text())["best_acc1"] == metrics["best_acc1"]
