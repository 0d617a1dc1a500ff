"""Hostile data, tried as a hostile user would (issue 23: damaged and unusual tar shards, labels, lying indexes,
unsupported locations, symlink loops and FIFOs, output folders, decompression bombs by bands and bytes, misleading
messages). Every case ends in one of two ways: a clean refusal (exit code 2, one `error:` line naming the file or
option, nothing written or deleted) or a counted, logged skip within the bad-sample rules (named `shard:key` or by
path); no hang (the kinds that used to hang run in a subprocess with a timeout) and no memory beyond a few hundred
MB (the bombs run in a subprocess that reports how far its peak resident memory grew)."""
import io
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import textwrap
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from fcmae.data import decode as decode_module
from fcmae.data.bad_samples import BadImageMonitor
from fcmae.data.decode import decode
from fcmae.data.folders import ImageFiles
from fcmae.data.labelled import build_datasets
from fcmae.data.shards import TarShards, open_dataset
from fcmae.runtime.cli import run_cli
from fcmae.runtime.errors import DataError, RunStopped
from fcmae.tools import make_shards as make_shards_tool
from fcmae.tools.make_shards import make_shards
from tests.conftest import TINY_PRETRAIN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RNG = np.random.default_rng(0)
GROWTH_LIMIT_MB = 400  # "no memory beyond a few hundred MB": peak resident growth past the imports


def png(seed: int = 0, size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, size[::-1] + (3,), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_tar(path, members):
    """A tar of (name, bytes) members, as WebDataset writers make them."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def labelled_folder(root, n=6, classes=("a",)):
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for k in range(n):
            (root / c / f"{k}.png").write_bytes(png(k))
    return root


def packed(tmp_path, n=6, classes=("a",)):
    """One shard made by make_shards from a labelled folder, and its index's sample columns."""
    folder = labelled_folder(tmp_path / "src", n, classes)
    result = make_shards(str(folder), str(tmp_path / "out"), shard_size=10 ** 9, progress=lambda line: None)
    shard = result["shards"][0]
    return shard, json.load(open(shard + ".idx.json"))["samples"]


def warnings_of(dataset, caplog):
    """Read every sample (each yields an image: the next that loads), then the monitor's warnings."""
    monitor = BadImageMonitor(dataset)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fcmae"):
        for i in range(len(dataset)):
            dataset[i]
        monitor.poll()
    return [r.getMessage() for r in caplog.records if r.name == "fcmae"]


def child(code: str, timeout: float = 240, cwd=ROOT):
    """Run `code` in a fresh interpreter (a kill after `timeout` s is a hang), its address space capped at 3 GB over
    its imports so that a case that used to allocate without bound fails instead of exhausting the machine.
    Returns (exit code or None on a hang, stdout, stderr, peak resident growth in MB after the imports)."""
    prologue = textwrap.dedent("""
        import json, os, resource, sys
        import torch, fcmae.data.shards, fcmae.data.labelled, fcmae.tools.data_stats, fcmae.tools.make_shards
        from fcmae.runtime.cli import run_cli
        size = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (size + 3 * 2 ** 30, size + 3 * 2 ** 30))
        START = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        def growth_mb():
            return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - START) / 1024
        """)
    epilogue = "\nprint('GROWTH_MB', growth_mb())\n"
    proc = subprocess.Popen([sys.executable, "-c", prologue + textwrap.dedent(code) + epilogue], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, out, err, None
    growth = [float(line.split()[1]) for line in out.splitlines() if line.startswith("GROWTH_MB ")]
    return proc.returncode, out, err, growth[-1] if growth else None


def cli_in_child(module: str, argv, timeout: float = 240):
    """`python -m module argv` (its run_cli entry) in a child: (exit code, stdout, stderr, growth MB)."""
    rc, out, err, growth = child(f"""
        from {module} import run
        rc = run_cli(run, {list(map(str, argv))!r})
        print('RC', rc)
        """, timeout)
    codes = [int(line.split()[1]) for line in out.splitlines() if line.startswith("RC ")]
    return (codes[0] if codes and rc == 0 else rc), out, err, growth


def one_error_line(err: str, *needles):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in err


def tree(path):
    """Every file under `path` with its bytes: what 'nothing written or deleted' compares."""
    out = {}
    for root, dirs, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = open(p, "rb").read() if os.path.isfile(p) else None
    return out


# ---------------------------------------------------------------- 2. damaged shards: counted, named shard:key


def _cut_in_header(shard, cols):
    os.truncate(shard, cols["offset"][3] - 512 + 200)  # inside the header of sample 3's image (its name is there)


def _cut_in_data(shard, cols):
    os.truncate(shard, cols["offset"][3] + 10)  # inside sample 3's image data


def _cut_at_member_boundary(shard, cols):
    os.truncate(shard, cols["offset"][3] - 512)  # exactly before sample 3's header: no end-of-archive marker


def _garbage_header(shard, cols):
    with open(shard, "r+b") as f:  # sample 3's header overwritten, the size kept
        f.seek(cols["offset"][3] - 512)
        f.write(bytes(RNG.integers(1, 255, 512, dtype=np.uint8)))


# kind -> (damage, entries: the 3 samples before it and one bad entry, named so)
DAMAGE = {"cut inside a member header": (_cut_in_header, "a/3"),
          "cut inside member data": (_cut_in_data, "a/3.png"),  # the cut sample itself is the bad entry
          "cut at a member boundary": (_cut_at_member_boundary, "byte"),
          "garbage member header": (_garbage_header, "byte")}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_shard_is_a_counted_named_skip(kind, tmp_path, caplog):
    damage, named = DAMAGE[kind]
    shard, cols = packed(tmp_path)
    damage(shard, cols)
    os.remove(shard + ".idx.json")
    tars = TarShards(shard, max_bad_fraction=0.5)
    assert len(tars) == 4  # the 3 samples before the damage, and one bad entry for it
    found = warnings_of(tars, caplog)
    assert len(tars.bad_indices()) == 1 and len(found) == 1, found
    assert f"skipped unreadable image {shard}:" in found[0] and named in found[0], found
    with pytest.raises(DataError, match=f"unreadable image {shard}:"):  # --bad-image error: the first stops the run
        strict = TarShards(shard, bad_image="error")
        for i in range(len(strict)):
            strict[i]


def test_damaged_shards_in_a_pretraining_run_are_skipped_and_logged(tmp_path):
    """The CLI end to end: two damaged shards among good ones, within --max-bad-fraction: one epoch of one batch
    visits every sample, the run finishes, and its log names each damage once, by shard and key."""
    from fcmae.pretrain.cli import cli

    folder = labelled_folder(tmp_path / "src", 12)
    result = make_shards(str(folder), str(tmp_path / "shards"), shard_size=25_000, progress=lambda line: None)
    damaged = result["shards"][:2]
    for shard, damage in zip(damaged, (_cut_in_header, _cut_in_data)):
        cols = json.load(open(shard + ".idx.json"))["samples"]
        assert len(cols["offset"]) >= 4  # room for the damage at sample 3
        damage(shard, cols)
    n = len(TarShards(str(tmp_path / "shards"), max_bad_fraction=0.5))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli([*TINY_PRETRAIN, "--input-size", "64", "--batch-size", str(n), "--epochs", "1",
             "--warmup-epochs", "0", "--num-workers", "0", "--knn-every-epochs", "0", "--max-bad-fraction", "0.3",
             "--data-path", str(tmp_path / "shards"), "--output-dir", str(out)])
    assert e.value.code == 0
    skipped = [line for line in (out / "log.txt").read_text().splitlines() if "skipped unreadable image" in line]
    assert len(skipped) == 2, skipped
    for shard in damaged:
        assert sum(f"skipped unreadable image {shard}:a/" in line for line in skipped) == 1, skipped


# ---------------------------------------------------------------- 2. keys, names, labels


def test_keys_with_dots_are_read_as_webdataset_reads_them(tmp_path, caplog):
    shard = write_tar(tmp_path / "s.tar", [("v1.2.shot0.png", png(1)), ("v1.2.shot0.cls", b"0"),
                                           ("x/img.v3.PNG", png(2))])
    tars = TarShards(shard)
    assert len(tars) == 2 and tars.member(0) == "v1.2.shot0.png" and tars.member(1) == "x/img.v3.PNG"
    assert np.array_equal(np.asarray(tars[0][0]), np.asarray(Image.open(io.BytesIO(png(1))).convert("RGB")))


def test_several_images_under_one_key_are_counted_in_a_warning(tmp_path, caplog):
    shard = write_tar(tmp_path / "s.tar", [("v1.2.shot0.png", png(1)), ("v1.2.shot1.png", png(2)),
                                           ("v2.png", png(3))])
    with caplog.at_level(logging.WARNING, logger="fcmae"):
        tars = TarShards(shard)
    assert len(tars) == 2
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "1 image member" in message and "v1.2.shot1.png" in message, message


def test_non_utf8_member_names_from_make_shards(tmp_path, caplog):
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.png").write_bytes(png(0))
    with open(os.path.join(os.fsencode(src), b"caf\xe9.png"), "wb") as f:
        f.write(png(1))
    result = make_shards(str(src), str(tmp_path / "out"), 10 ** 9, progress=lambda line: None)
    tars = TarShards(result["data_path"])
    assert len(tars) == 2
    for i in range(2):
        img, _ = tars[i]
        tars.filename(i).encode("utf-8")  # printable: no lone surrogates in what is logged
    assert "caf\\xe9.png" in tars.filename(0) + tars.filename(1)
    assert not warnings_of(tars, caplog)


BAD_LABELS = {"10**20": str(10 ** 20).encode(), "10**9": b"1000000000", "negative": b"-3", "text": b"cat",
              "empty": b"", "1 MB of digits": b"7" * 2 ** 20}


def _labelled_shards(root, label: bytes):
    for split in ("train", "val"):
        os.makedirs(root / split)
        write_tar(root / split / "s-000000.tar",
                  [("0.png", png(0)), ("0.cls", b"0"), ("1.png", png(1)), ("1.cls", label if split == "train" else b"1"),
                   ("2.png", png(2)), ("2.cls", b"1")])
    return root


@pytest.mark.parametrize("case", list(BAD_LABELS))
def test_bad_labels_pretraining_ignores_them_finetuning_refuses(case, tmp_path):
    """Pretraining reads no label (no traceback, no multi-GB class list); fine-tuning refuses with one line naming
    the shard, the member and what it holds. Run in a child: a 10**9 label used to allocate without bound."""
    root = _labelled_shards(tmp_path, BAD_LABELS[case])
    rc, out, err, growth = child(f"""
        from fcmae.data.shards import open_dataset
        from fcmae.data.labelled import build_datasets
        from fcmae.runtime.errors import DataError, RunStopped
        ds = open_dataset({str(root / "train")!r})
        print("SAMPLES", len(ds), len([ds[i] for i in range(len(ds))]))
        try:
            build_datasets(data_path={str(root)!r}, input_size=(32, 32))
            print("ACCEPTED")
        except DataError as e:
            print("REFUSED", e)
        """, timeout=240)
    assert rc == 0, err[-2000:]
    assert "SAMPLES 3 3" in out
    refusal = [line for line in out.splitlines() if line.startswith("REFUSED ")]
    assert refusal and "1.cls" in refusal[0] and "s-000000.tar" in refusal[0], out
    assert "no .cls label" not in refusal[0]
    assert growth < GROWTH_LIMIT_MB


def test_missing_labels_are_reported_as_missing(tmp_path):
    root = tmp_path
    for split in ("train", "val"):
        os.makedirs(root / split)
        write_tar(root / split / "s-000000.tar", [("0.png", png(0)), ("0.cls", b"0"), ("1.png", png(1))])
    with pytest.raises(DataError, match=r"1 sample has no \.cls label"):
        build_datasets(data_path=str(root), input_size=(32, 32))


def test_labels_beyond_classes_json_are_refused(tmp_path):
    root = _labelled_shards(tmp_path, b"5")
    json.dump(["cat", "dog"], open(root / "train" / "classes.json", "w"))
    with pytest.raises(DataError, match=r"1\.cls.*5.*classes\.json"):
        build_datasets(data_path=str(root), input_size=(32, 32))


# ---------------------------------------------------------------- 2. an index that lies


def _other_shards_index(shard, cols, index):
    """The index of a shard of the same size with its members in another order (a repack, mtime kept)."""
    index["samples"] = {k: v[::-1] if k in ("key", "ext", "label", "cls") else v for k, v in cols.items()}


def _missing_column(shard, cols, index):
    del index["samples"]["size"]


def _unequal_columns(shard, cols, index):
    index["samples"]["offset"] = index["samples"]["offset"][:-1]


def _offsets_past_the_end(shard, cols, index):
    index["samples"]["offset"] = [o + 10 ** 9 for o in index["samples"]["offset"]]


def _samples_not_a_dict(shard, cols, index):
    index["samples"] = [1, 2, 3]


def _wrong_types(shard, cols, index):
    index["samples"]["offset"] = ["x"] * len(cols["offset"])


INDEX_LIES = {"another order": _other_shards_index, "missing column": _missing_column,
              "unequal columns": _unequal_columns, "offsets past the end": _offsets_past_the_end,
              "samples not a dict": _samples_not_a_dict, "wrong types": _wrong_types}


@pytest.mark.parametrize("lie", list(INDEX_LIES))
def test_an_index_that_does_not_match_its_shard_is_rebuilt(lie, tmp_path, caplog):
    shard, cols = packed(tmp_path, n=5, classes=("a", "b"))
    index = json.load(open(shard + ".idx.json"))
    INDEX_LIES[lie](shard, cols, index)
    json.dump(index, open(shard + ".idx.json", "w"))  # the stamp (size, mtime) still matches the shard
    tars = TarShards(shard)
    assert len(tars) == 10 and [tars.member(i) for i in range(10)] == [f"{c}/{k}.png" for c in "ab" for k in range(5)]
    assert list(tars.targets) == [0] * 5 + [1] * 5
    assert not warnings_of(tars, caplog)
    assert json.load(open(shard + ".idx.json"))["samples"]["key"][0] == "a/0"  # rewritten


# ---------------------------------------------------------------- 2. locations that are not local tar files


def _gz_shards(tmp_path):
    src = write_tar(tmp_path / "s.tar", [("0.png", png(0))])
    data = open(src, "rb").read()
    os.remove(src)
    import gzip

    for name in ("train-000000.tar.gz", "train-000001.tar.gz"):
        (tmp_path / name).write_bytes(gzip.compress(data))
    return tmp_path


UNSUPPORTED = {"https brace pattern": lambda t: "https://example.com/train-{000000..000009}.tar",
               "s3 url": lambda t: "s3://bucket/train-000000.tar",
               "gs url": lambda t: "gs://bucket/shards/",
               "pipe": lambda t: "pipe:curl -s https://example.com/train-000000.tar",
               ".tar.gz pattern": lambda t: str(_gz_shards(t)) + "/train-{000000..000001}.tar.gz",
               ".tgz file": lambda t: str(t / "x.tgz"),
               "folder of .tar.gz": lambda t: str(_gz_shards(t)),
               "gzip data named .tar": lambda t: str(shutil.copy(_gz_shards(t) / "train-000000.tar.gz", t / "z.tar"))}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_locations_say_what_is_supported(case, tmp_path, capsys):
    from fcmae.pretrain.cli import cli

    data_path = UNSUPPORTED[case](tmp_path)
    with pytest.raises(DataError, match="not supported") as e:
        open_dataset(data_path)
    assert "local" in str(e.value) and ".tar" in str(e.value)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        cli([*TINY_PRETRAIN, "--input-size", "64", "--num-workers", "0", "--data-path", data_path,
             "--output-dir", str(out)])
    assert exit_.value.code == 2
    one_error_line(capsys.readouterr().err, "not supported")
    assert not out.exists()


# ---------------------------------------------------------------- 2. a wids-compatible index


def test_wids_reads_the_shards_make_shards_writes(tmp_path):
    wids = pytest.importorskip("wids")
    folder = labelled_folder(tmp_path / "src", 5, classes=("a", "b"))
    result = make_shards(str(folder), str(tmp_path / "out"), shard_size=20_000, progress=lambda line: None)
    assert len(result["shards"]) >= 2
    spec = json.load(open(tmp_path / "out" / "train-shardindex.json"))
    assert spec["wids_version"] == 1 and sum(s["nsamples"] for s in spec["shardlist"]) == 10
    ds = wids.ShardListDataset(str(tmp_path / "out" / "train-shardindex.json"), cache_dir=str(tmp_path / "cache"),
                               transformations=[])
    ours = TarShards(result["data_path"])
    assert len(ds) == len(ours) == 10
    for i in (0, 4, 9):
        sample = ds[i]
        assert sample["__key__"] == ours.keys[i].decode()
        assert sample[".png"].read() == ours.read_bytes(i)
        assert int(sample[".cls"].read()) == ours.targets[i]


# ---------------------------------------------------------------- 3. walking folders: links, FIFOs


def _loops(root):
    os.symlink("..", root / "a" / "up")  # back to the root, twice: os.walk following links explodes
    os.symlink("../..", root / "a" / "upup")


def _alias_into_the_tree(root):
    os.symlink(str(root / "a"), root / "alias")  # a second name for a class folder: duplicates


def _fifo(root):
    os.mkfifo(root / "a" / "b.png")  # opened, it waits forever for a writer


def _device(root):
    os.symlink("/dev/zero", root / "a" / "zero.png")  # endless bytes


WALKS = {"symlink loops": _loops, "link back into the tree": _alias_into_the_tree, "FIFO named b.png": _fifo,
         "device named zero.png": _device}


@pytest.mark.parametrize("case", list(WALKS))
@pytest.mark.parametrize("tool", ["make_shards", "data_stats"])
def test_links_and_special_files_neither_hang_nor_duplicate(case, tool, tmp_path):
    root = labelled_folder(tmp_path / "src", 4)
    WALKS[case](root)
    if tool == "make_shards":
        rc, out, err, _ = cli_in_child("fcmae.tools.make_shards", [root, tmp_path / "out"], timeout=90)
        assert rc == 0, err[-2000:]
        assert "wrote 4 images" in out, out
    else:
        rc, out, err, _ = cli_in_child("fcmae.tools.data_stats", [root, "--in-chans", "3", "--num-workers", "0"],
                                       timeout=90)
        assert rc == 0, err[-2000:]
        assert "# 4 8-bit images" in out, out
    assert "Traceback" not in err


def test_links_out_of_the_tree_are_still_followed(tmp_path):
    root = labelled_folder(tmp_path / "src", 2)
    elsewhere = labelled_folder(tmp_path / "elsewhere", 3, classes=("b",))
    os.symlink(str(elsewhere / "b"), root / "b")
    files = ImageFiles(str(root))
    assert len(files) == 5 and files.class_to_idx == {"a": 0, "b": 1}


# ---------------------------------------------------------------- 3. make_shards' output folder


def _unrelated_file(out, folder):
    out.mkdir()
    (out / "notes.txt").write_text("mine")


def _unrelated_classes_json(out, folder):
    out.mkdir()
    (out / "classes.json").write_text('["x", "y"]')


def _previous_output_other_classes(out, folder):
    other = labelled_folder(out.parent / "other", 2, classes=("p", "q"))
    make_shards(str(other), str(out), 10 ** 9, prefix="val", progress=lambda line: None)


def _a_file(out, folder):
    out.write_text("a file")


def _previous_output_without_overwrite(out, folder):
    make_shards(str(folder), str(out), 10 ** 9, progress=lambda line: None)


REFUSED_OUTPUTS = {"an unrelated file": (_unrelated_file, [], "notes.txt"),
                   "an unrelated classes.json": (_unrelated_classes_json, [], "classes.json"),
                   "another prefix's classes": (_previous_output_other_classes, [], "classes.json"),
                   "a file": (_a_file, [], "is a file"),
                   "previous shards, no --overwrite": (_previous_output_without_overwrite, [], "--overwrite"),
                   "unrelated file with --overwrite": (_unrelated_file, ["--overwrite"], "notes.txt")}


@pytest.mark.parametrize("case", list(REFUSED_OUTPUTS))
def test_make_shards_refuses_an_output_folder_it_did_not_write(case, tmp_path, capsys):
    prepare, extra, named = REFUSED_OUTPUTS[case]
    folder = labelled_folder(tmp_path / "src", 3)
    out = tmp_path / "out"
    prepare(out, folder)
    before = tree(out) if out.is_dir() else out.read_bytes()
    capsys.readouterr()
    assert run_cli(make_shards_tool.run, [str(folder), str(out)] + extra) == 2
    one_error_line(capsys.readouterr().err, named)
    assert (tree(out) if out.is_dir() else out.read_bytes()) == before


def test_overwrite_keeps_the_old_shards_until_the_new_ones_exist(tmp_path, monkeypatch, capsys):
    folder = labelled_folder(tmp_path / "src", 8)
    out = tmp_path / "out"
    make_shards(str(folder), str(out), 12_000, progress=lambda line: None)
    before = tree(out)
    real = tarfile.TarFile.addfile
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 5:
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "addfile", failing)
    with pytest.raises(RunStopped, match="No space left on device.*left as it was"):
        make_shards(str(folder), str(out), 12_000, overwrite=True, progress=lambda line: None)
    assert tree(out) == before  # old shards, indexes and classes.json untouched; no temporary leftovers
    assert sorted(os.listdir(out)) == sorted(before)


def test_overwrite_replaces_a_previous_output_whole(tmp_path):
    folder = labelled_folder(tmp_path / "src", 8)
    out = tmp_path / "out"
    first = make_shards(str(folder), str(out), 12_000, progress=lambda line: None)
    assert len(first["shards"]) >= 3
    shutil.rmtree(folder / "a")
    labelled_folder(tmp_path / "src", 2, classes=("c",))
    second = make_shards(str(folder), str(out), 10 ** 9, overwrite=True, progress=lambda line: None)
    assert sorted(os.listdir(out)) == ["classes.json", "train-000000.tar", "train-000000.tar.idx.json",
                                       "train-shardindex.json"]
    assert json.load(open(out / "classes.json")) == ["c"] and len(TarShards(second["data_path"])) == 2


def test_a_second_prefix_with_the_same_classes_is_welcome(tmp_path):
    folder = labelled_folder(tmp_path / "src", 2)
    out = tmp_path / "out"
    make_shards(str(folder), str(out), 10 ** 9, prefix="val", progress=lambda line: None)
    make_shards(str(folder), str(out), 10 ** 9, prefix="train", progress=lambda line: None)
    assert len(TarShards(str(out / "train-000000.tar"))) == 2 and len(TarShards(str(out / "val-000000.tar"))) == 2


# ---------------------------------------------------------------- 4. decompression bombs by bands and bytes


def deflate_tiff(height, width, samples=1, dtype=np.uint16, pages=1) -> bytes:
    """A tiled deflate TIFF whose tiles all point at one compressed tile of zeros: a few KB that decode to
    height x width x samples x itemsize bytes per page."""
    tile, dtype = 256, np.dtype(dtype)
    compressed = zlib.compress(bytes(tile * tile * samples * dtype.itemsize), 9)
    n = -(-height // tile) * -(-width // tile)
    out = bytearray(b"II*\0\0\0\0\0")
    data_at = len(out)
    out += compressed
    link = 4  # where the offset of the next IFD goes
    SHORT, LONG = 3, 4
    for _ in range(pages):
        fields = [(256, LONG, [width]), (257, LONG, [height]), (258, SHORT, [8 * dtype.itemsize] * samples),
                  (259, SHORT, [8]), (262, SHORT, [1]), (277, SHORT, [samples]), (284, SHORT, [1]),
                  (322, SHORT, [tile]), (323, SHORT, [tile]), (324, LONG, [data_at] * n),
                  (325, LONG, [len(compressed)] * n), (339, SHORT, [{"u": 1, "i": 2, "f": 3}[dtype.kind]] * samples)]
        packed = {}
        for tag, kind, values in fields:
            raw = struct.pack(f"<{len(values)}{'H' if kind == SHORT else 'I'}", *values)
            if len(raw) > 4:  # out of line, word-aligned
                out += b"\0" * (len(out) % 2)
                packed[tag] = struct.pack("<I", len(out))
                out += raw
            else:
                packed[tag] = raw.ljust(4, b"\0")
        out += b"\0" * (len(out) % 2)
        struct.pack_into("<I", out, link, len(out))
        out += struct.pack("<H", len(fields))
        for tag, kind, values in fields:
            out += struct.pack("<HHI", tag, kind, len(values)) + packed[tag]
        link = len(out)
        out += b"\0\0\0\0"
    return bytes(out)


def png_header_only(width, height, mode_bytes) -> bytes:
    """A PNG of this size (colour type 6, RGBA 8-bit, or 0 for 16-bit grey) whose pixel data is missing."""
    color, depth = mode_bytes
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)) \
        + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def npy_header_only(shape, dtype) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                               "shape": tuple(shape)})
    return buf.getvalue() + b"\0" * 64


# name -> (file bytes, in_chans): each under MAX_PIXELS pixels, each over MAX_DECODED_BYTES decoded
BOMBS = {"TIFF of 12 uint16 bands": (lambda: deflate_tiff(8192, 8192, samples=12), "tif", 12),
         "TIFF of float64 samples": (lambda: deflate_tiff(12000, 12000, samples=1, dtype=np.float64), "tif", 1),
         "TIFF stack of 4 pages": (lambda: deflate_tiff(12000, 12000, samples=1, pages=4), "tif", 4),
         "RGBA PNG": (lambda: png_header_only(12000, 12000, (6, 8)), "png", 3),
         ".npy of 20 float32 bands": (lambda: npy_header_only((8000, 8000, 20), np.float32), "npy", 20)}


@pytest.mark.parametrize("case", list(BOMBS))
def test_bombs_are_refused_from_their_header(case, monkeypatch):
    make, ext, in_chans = BOMBS[case]
    data = make()
    assert len(data) < 100_000
    with pytest.raises(ValueError, match="bytes") as e:
        decode(io.BytesIO(data), f"x.{ext}", in_chans)
    assert "MAX_DECODED_BYTES" in str(e.value)


@pytest.mark.parametrize("case", ["TIFF of 12 uint16 bands", "TIFF stack of 4 pages"])
def test_a_bomb_in_data_stats_is_a_counted_skip_in_bounded_memory(case, tmp_path):
    make, ext, in_chans = BOMBS[case]
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / f"bomb.{ext}").write_bytes(make())
    for k in range(3):
        np.save(folder / f"ok{k}.npy", RNG.integers(0, 1000, (16, 16, in_chans)).astype(np.uint16))
    rc, out, err, growth = cli_in_child("fcmae.tools.data_stats", [folder, "--in-chans", in_chans, "--num-workers", 0,
                                                                   "--max-bad-fraction", 0.5])
    assert rc == 0, err[-2000:]
    assert f"skipped unreadable image {folder}/bomb.{ext}: " in err and "bytes" in err, err
    assert "# 3 high-bit-depth images" in out and "Traceback" not in err
    assert growth < GROWTH_LIMIT_MB, growth


def test_a_bomb_in_a_shard_is_a_counted_skip_in_bounded_memory(tmp_path):
    """Pretraining's reading path (open_dataset with the pretraining transform) on a shard holding a bomb."""
    make, ext, in_chans = BOMBS["TIFF of 12 uint16 bands"]
    members = [(f"{k}.npy", npy_bytes(RNG.integers(0, 1000, (16, 16, in_chans)).astype(np.uint16))) for k in range(3)]
    shard = write_tar(tmp_path / "s.tar", members[:1] + [("bomb.tif", make())] + members[1:])
    rc, out, err, growth = child(f"""
        from fcmae.data.shards import open_dataset
        from fcmae.data.transforms import pretrain_transform
        from fcmae.data.bad_samples import BadImageMonitor
        from fcmae.runtime.logs import setup_logging
        setup_logging()
        ds = open_dataset({shard!r}, transform=pretrain_transform((32, 32)), input_size=(32, 32), in_chans={in_chans},
                          max_bad_fraction=0.5)
        monitor = BadImageMonitor(ds)
        for i in range(len(ds)):
            ds[i]
        monitor.poll()
        """)
    assert rc == 0, err[-2000:]
    assert f"skipped unreadable image {shard}:bomb.tif: " in err and "bytes" in err, err
    assert growth < GROWTH_LIMIT_MB, growth


def npy_bytes(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_an_oversized_member_is_not_read_into_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(decode_module, "MAX_DECODED_BYTES", 10_000)
    shard = write_tar(tmp_path / "s.tar", [("0.png", png(0)), ("1.png", b"\x89PNG" + b"\0" * 20_000)])
    tars = TarShards(shard, max_bad_fraction=0.5)
    with pytest.raises(ValueError, match="bytes"):
        tars.load(1)


# ---------------------------------------------------------------- 6. truer messages, no stray warnings


def test_complex_tiff_is_described_by_its_sample_type():
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((8, 8), np.complex64))
    for in_chans in (1, 3, 4):
        buf.seek(0)
        with pytest.raises(Exception) as e:
            decode(buf, "c.tif", in_chans)
        assert "complex" in str(e.value) and "channel" not in str(e.value), (in_chans, str(e.value))


def test_no_pil_bomb_warning_under_our_own_limit():
    """PIL warns above half our pixel limit, also when the transforms crop such an image (95 MB here)."""
    img = Image.new("L", (10_000, 9_500))
    assert 9_500 * 10_000 <= decode_module.MAX_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        img.crop((0, 0, 10_000, 9_400))  # not the whole image: PIL copies that without a check
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_the_walk_lists_an_ordinary_tree_exactly_as_timm(tmp_path):
    """Valid data unchanged: nested class folders, natural-order ties (img01/img1, case), other extensions, a link
    to a folder elsewhere and a link to a file: the same (path, target) list and classes as timm's reader."""
    from timm.data.readers.reader_image_folder import find_images_and_targets

    from fcmae.data.decode import IMAGE_EXTENSIONS
    from fcmae.data.folders import find_images

    root = tmp_path / "tree"
    for rel in ["cat/img1.png", "cat/img01.png", "cat/IMG1.PNG", "cat/sub/deep 2.jpg", "cat/sub/deep 10.jpg",
                "dog/a.v2.npy", "dog/notes.txt", "dog/b.TIF", "zebra/x/y/z.webp", "top.png"]:
        os.makedirs((root / rel).parent, exist_ok=True)
        (root / rel).write_bytes(b"x")
    labelled_folder(tmp_path / "elsewhere", 2, classes=("far",))
    os.symlink(str(tmp_path / "elsewhere" / "far"), root / "far")
    os.symlink(str(tmp_path / "elsewhere" / "far" / "0.png"), root / "dog" / "linked.png")
    for class_to_idx in (None, {"cat": 0, "far": 1}):
        assert find_images(str(root), class_to_idx=class_to_idx) == find_images_and_targets(
            str(root), types=IMAGE_EXTENSIONS, class_to_idx=class_to_idx)
