"""WebDataset tar shards (fcmae/data/shard_index.py, fcmae/data/shards.py, fcmae/tools/make_shards.py): shards of a folder read back as the folder does
(images, labels, seeded order), bad members skipped and named by shard and key, the index cache reused and
rebuilt, brace patterns, and the tool's errors."""
import io
import json
import logging
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from fcmae.data import shard_index
from fcmae.data.bad_samples import BadImageMonitor
from fcmae.data.folders import ImageFiles
from fcmae.data.sampling import EpochSampler, SeededDataset, make_loader
from fcmae.data.shard_index import expand_braces, is_shards, load_index, shard_paths, split_name
from fcmae.data.shards import TarShards, open_dataset
from fcmae.data.transforms import pretrain_transform
from fcmae.pretrain.data import MaskedImages
from fcmae.runtime.errors import DataError, UsageError
from fcmae.tools.make_shards import make_shards, parse_size
from fcmae.tools.make_shards import run as make_shards_cli


def photo(name, size):
    from skimage import data as skdata

    return Image.fromarray(getattr(skdata, name)()).convert("RGB").resize(size)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes, JPEG and PNG (with dots, spaces and upper-case extensions in names), one EXIF-rotated JPEG."""
    root = tmp_path_factory.mktemp("folder")
    names = ["astronaut", "coffee", "chelsea", "rocket"]
    for c, cls in enumerate(["cat", "dog", "zebra"]):
        os.makedirs(root / cls)
        for k in range(4):
            img = photo(names[(c + k) % 4], (40 + 8 * k, 32))
            if k % 2:
                img.save(root / cls / f"img {k}.v2.PNG")
            else:
                img.save(root / cls / f"{k}.JPG", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    photo("coffee", (48, 32)).save(root / "dog" / "rotated.jpg", exif=exif)
    return root


@pytest.fixture(scope="module")
def packed(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    result = make_shards(str(folder), str(out), shard_size=20_000, progress=lambda line: None)
    assert len(result["shards"]) >= 3  # small shards: samples spread over several
    return result


def test_shards_read_back_as_the_folder(folder, packed):
    files, tars = ImageFiles(str(folder)), TarShards(packed["data_path"])
    assert len(tars) == len(files) == 13 == packed["samples"]
    assert tars.classes == ["cat", "dog", "zebra"] == sorted(files.class_to_idx)
    assert tars.num_classes == 3 and tars.class_to_idx == files.class_to_idx
    for i in range(len(files)):
        (a, la), (b, lb) = tars[i], files[i]
        assert la == lb and np.array_equal(np.asarray(a), np.asarray(b)), files.filename(i)
        shard, member = tars.filename(i).split(":")
        assert shard in packed["shards"]
        stem, ext = os.path.splitext(os.path.relpath(files.filename(i), folder))
        assert member == stem.replace(".", "_") + ext.lower()  # the key ends at the first dot (WebDataset)
    assert tars[files.samples.index((str(folder / "dog" / "rotated.jpg"), 1))][0].size == (32, 48)  # EXIF applied
    tars.keep_only([5, 0])
    assert len(tars) == 2 and tars.member(1) == "cat/0.jpg" and list(tars.targets) == [1, 0] and len(tars.bad) == 2


def test_same_seeded_batches_as_the_folder_with_workers(folder, packed):
    def batches(dataset, workers):
        ds = SeededDataset(MaskedImages(dataset, 4, 0.5), seed=1, rngs=("torch",))
        sampler = EpochSampler(len(ds), seed=1)
        loader = make_loader(ds, sampler, 4, workers)
        out = []
        for epoch in (0, 1):
            sampler.set_epoch(epoch, start=4 * epoch)
            out += [(x.clone(), m.clone()) for x, m in loader]
        return out

    tf = pretrain_transform((64, 64))
    expected = batches(ImageFiles(str(folder), transform=tf), 0)
    got = batches(TarShards(packed["data_path"], transform=tf, input_size=(64, 64)), 2)
    assert len(got) == len(expected) == 3 + 2
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, expected))


def test_bad_members_are_skipped_counted_and_named(tmp_path, caplog):
    src = tmp_path / "src"
    os.makedirs(src / "a")
    for k in range(6):
        photo("astronaut", (32, 32)).save(src / "a" / f"{k}.jpg")
    good = (src / "a" / "0.jpg").read_bytes()
    (src / "a" / "2.jpg").write_bytes(good[:len(good) // 2])  # truncated
    (src / "a" / "4.jpg").write_bytes(b"")  # empty
    result = make_shards(str(src), str(tmp_path / "out"), shard_size=30_000, progress=lambda line: None)
    tars = TarShards(result["data_path"], transform=pretrain_transform((32, 32)), max_bad_fraction=0.5)
    monitor = BadImageMonitor(tars)
    loader = make_loader(SeededDataset(tars, seed=0), EpochSampler(len(tars)), 3, num_workers=2)
    with caplog.at_level(logging.WARNING, logger="fcmae"):
        assert sum(len(x) for x, _ in loader) == 6  # every index yields an image: the next one that loads
        monitor.poll()
    assert tars.bad_indices() == [2, 4]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert any(":a/2.jpg: " in w and "truncated" in w.lower() for w in warnings), warnings
    assert any(":a/4.jpg: empty file" in w for w in warnings), warnings
    assert all(".tar:a/" in w for w in warnings)

    strict = TarShards(result["data_path"], bad_image="error")
    with pytest.raises(DataError, match=r"unreadable image .*train-00000\d\.tar:a/2\.jpg: .*[Tt]runcated"):
        for i in range(len(strict)):
            strict[i]


def test_index_cache_reused_then_rebuilt_when_the_shard_changes(folder, tmp_path, monkeypatch):
    result = make_shards(str(folder), str(tmp_path), shard_size=10 ** 9, progress=lambda line: None)
    shard = result["shards"][0]
    assert os.path.isfile(shard + ".idx.json")  # written by make_shards
    scans = []
    real_scan = shard_index.scan_shard
    monkeypatch.setattr(shard_index, "scan_shard", lambda path: scans.append(path) or real_scan(path))
    first = TarShards(shard)
    assert scans == [] and len(first) == 13  # the cached index
    with tarfile.open(shard, "a") as tar:  # the shard changes: one more sample
        data = (folder / "cat" / "0.JPG").read_bytes()
        info = tarfile.TarInfo("extra/new.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    second = TarShards(shard)
    assert scans == [shard] and len(second) == 14 and second.filename(13).endswith(":extra/new.jpg")
    assert second.targets[13] == -1
    TarShards(shard)
    assert scans == [shard]  # cached again
    index = json.load(open(shard + ".idx.json"))
    assert index["size"] == os.path.getsize(shard)


def test_index_cache_falls_back_to_the_cache_dir(folder, tmp_path, monkeypatch):
    result = make_shards(str(folder), str(tmp_path / "s"), shard_size=10 ** 9, progress=lambda line: None)
    shard = result["shards"][0]
    os.remove(shard + ".idx.json")
    monkeypatch.setenv("FCMAE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(shard_index, "index_path", lambda s: str(tmp_path / "no-such-dir" / "x" / "i.json"))
    real_write = shard_index._write_json

    def write(path, obj):
        if "no-such-dir" in path:
            raise PermissionError("read-only")
        real_write(path, obj)

    monkeypatch.setattr(shard_index, "_write_json", write)
    assert len(load_index(shard)["samples"]["key"]) == 13
    assert len(os.listdir(tmp_path / "cache")) == 1


def test_brace_patterns_folders_and_missing_shards(folder, packed, tmp_path):
    assert expand_braces("a-{008..011}.tar") == ["a-008.tar", "a-009.tar", "a-010.tar", "a-011.tar"]
    assert expand_braces("s{0..1}-{x,y}.tar") == ["s0-x.tar", "s0-y.tar", "s1-x.tar", "s1-y.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(DataError):
        expand_braces("a-{5..2}.tar")
    out = os.path.dirname(packed["shards"][0])
    assert shard_paths(out) == packed["shards"] == shard_paths(packed["data_path"])
    assert is_shards(out) and is_shards(packed["data_path"]) and not is_shards(str(folder))
    assert len(open_dataset(out)) == 13 and isinstance(open_dataset(str(folder)), ImageFiles)
    n = len(packed["shards"])
    with pytest.raises(DataError, match=f"1 of {n + 1} shards .* not found"):
        TarShards(os.path.join(out, f"train-{{000000..{n:06d}}}.tar"))
    with pytest.raises(DataError, match="no .tar shards"):
        shard_paths(str(tmp_path))
    assert split_name("a.b/c.d.e") == ("a.b/c", "d.e") and split_name("x") == ("x", "")


def test_npy_and_unlabelled_flat_folder(tmp_path):
    src = tmp_path / "flat"
    os.makedirs(src)
    rgb = np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    np.save(src / "arr.npy", rgb)
    photo("chelsea", (24, 16)).save(src / "photo.png")
    result = make_shards(str(src), str(tmp_path / "out"), shard_size=10 ** 6, progress=lambda line: None)
    assert result["classes"] == [] and not os.path.exists(tmp_path / "out" / "classes.json")
    tars = TarShards(result["data_path"])
    assert [tars.member(i) for i in range(2)] == ["arr.npy", "photo.png"]
    assert tars.num_classes == 0 and tars.classes == [] and list(tars.targets) == [-1, -1]
    img, label = tars[0]
    img = img.permute(1, 2, 0).numpy() if isinstance(img, torch.Tensor) else np.asarray(img)  # (C, H, W) or PIL
    assert label == -1 and np.array_equal(img, rgb)


def test_make_shards_cli_errors_and_sizes(folder, tmp_path, capsys):
    from fcmae.runtime.cli import run_cli

    assert parse_size("500MB") == 500 * 10 ** 6 and parse_size("1GB") == 10 ** 9
    assert parse_size("123456") == 123456 and parse_size("1.5GiB") == 3 * 2 ** 29 and parse_size("30 kb") == 30000
    for bad in ("1XB", "-1", "GB", "10"):
        with pytest.raises(UsageError):
            parse_size(bad)
    cases = [([str(tmp_path / "missing"), str(tmp_path / "o")], "data folder not found"),
             ([str(folder), str(tmp_path / "o"), "--shard-size", "big"], "--shard-size 'big'"),
             ([str(folder), str(tmp_path / "o"), "--prefix", "a/b"], "--prefix")]
    for argv, message in cases:
        assert run_cli(make_shards_cli, argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert run_cli(make_shards_cli, [str(folder), str(tmp_path / "o"), "--shard-size", "1MB"]) == 0
    out = capsys.readouterr().out
    assert "train-000000.tar" in out and "--data-path '" in out
    assert run_cli(make_shards_cli, [str(folder), str(tmp_path / "o")]) == 2
    assert "already holds train-*.tar shards" in capsys.readouterr().err
    assert run_cli(make_shards_cli, [str(folder), str(tmp_path / "o"), "--overwrite"]) == 0
    # deterministic: the same folder gives the same bytes
    first = (tmp_path / "o" / "train-000000.tar").read_bytes()
    make_shards(str(folder), str(tmp_path / "again"), 10 ** 6, progress=lambda line: None)
    assert (tmp_path / "again" / "train-000000.tar").read_bytes() == first
