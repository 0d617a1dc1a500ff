"""Bad invocations of every command-line tool: each ends as exactly one `error: ...` line on stderr naming the
option (and its valid range where it has one), exit code 2, no traceback, and nothing written (the output dir is
not created). One table, run in-process (fast); a few rows also run as real processes.

Each row: (cli, arguments, expected parts of the error line). The arguments come after the CLI's harmless base
arguments (`BASE`: tiny data, one step), so an invocation wrongly accepted runs briefly and then fails the
"nothing written" check instead of training for hours. Placeholders: {ckpt}, {garbage}, {six}, {pets}, ... name
the fixture's files, {out} the output dir that must not appear, {dir} an existing empty folder that must stay
empty; `yaml:KEY: VALUE` becomes `-c FILE` holding that YAML.
"""
import os
import subprocess
import sys
import time

import pytest

from fcmae.pretrain.cli import main as pretrain_main
from fcmae.runtime.cli import run_cli
from finetune.cli import run as finetune_run
from fcmae.tools import convert, data_stats, knn_eval, make_shards, visualize
from tools import bench_memory, benchmark, feature_diversity
from tests.conftest import TINY_PRETRAIN, write_small_folders

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")


def _code(fn, argv):
    try:
        result = fn(argv)
    except SystemExit as e:  # tools that exit themselves (argparse, bench_memory)
        return e.code
    return result if isinstance(result, int) else 0


CLIS = {  # name: (in-process call returning the exit code, module for `python -m`)
    "pretrain": (lambda argv: run_cli(pretrain_main, argv), "fcmae.pretrain"),
    "finetune": (lambda argv: run_cli(finetune_run, argv), "finetune"),
    "knn_eval": (lambda argv: run_cli(knn_eval.run, argv), "fcmae.tools.knn_eval"),
    "visualize": (lambda argv: run_cli(visualize.run, argv), "fcmae.tools.visualize"),
    "convert": (convert.main, "fcmae.tools.convert"),
    "benchmark": (lambda argv: run_cli(benchmark.run_benchmark, argv), "tools.benchmark"),
    "bench_memory": (bench_memory.main, "tools.bench_memory"),
    "data_stats": (lambda argv: run_cli(data_stats.run, argv), "fcmae.tools.data_stats"),
    "make_shards": (lambda argv: run_cli(make_shards.run, argv), "fcmae.tools.make_shards"),
    "feature_diversity": (lambda argv: run_cli(feature_diversity.run, argv), "tools.feature_diversity"),
}

# harmless arguments each row starts from (a later repetition of an option wins); an option a `yaml:` row sets is
# left out of them (the command line would win over the file)
BASE = {
    "pretrain": ["--data-path", "{six}", "--input-size", "64", "--batch-size", "2", "--max-steps", "1",
                 "--knn-every-epochs", "0", "--num-workers", "0", "--output-dir", "{out}"],
    "finetune": ["--data-path", "{pets}", "--input-size", "32", "--batch-size", "2", "--max-steps", "1",
                 "--num-workers", "0", "--output-dir", "{out}"],
    "knn_eval": ["{ckpt}", "--data-path", "{pets}", "--input-size", "32", "--num-workers", "0",
                 "--json", "{out}/knn.json"],
    "visualize": ["{ckpt}", "--data-path", "{six}", "--num", "2", "--out", "{out}/grid.png"],
    "convert": [],
    "benchmark": ["--variants", "atto", "--input-sizes", "64", "--batch-sizes", "2", "--rounds", "1", "--threads", "1",
                  "--json", "{out}/bench.json"],
    "bench_memory": ["--model", "convnextv2_atto", "--input-size", "64", "--threads", "1",
                     "--json", "{out}/mem.json"],
    "data_stats": ["{six}", "--in-chans", "3", "--num-workers", "0", "--out", "{out}/stats.yaml"],
    "make_shards": ["{six}", "{out}/shards"],
    "feature_diversity": ["{ckpt}", "--images", "2", "--input-size", "32", "--data-path", "{six}",
                          "--json", "{out}/fd.json"],
}

POS = "> 0"  # the range texts the error lines must show
NONNEG = ">= 0"
ONE = ">= 1"

TRAINING = ("pretrain", "finetune")
CASES = []


def case(cli, args, *expect):
    CASES.append((cli, list(args), list(expect)))


# --- floats: non-finite, negative, zero where it must be positive (both training CLIs)
for cli in TRAINING:
    for value in ("nan", "inf", "-1", "0"):
        case(cli, ["--lr", value], "--lr", POS)
    for value in ("nan", "-1", "0", "-inf"):
        case(cli, ["--blr", value], "--blr", POS)
    for value in ("nan", "-1e-6", "inf"):
        case(cli, ["--min-lr", value], "--min-lr", NONNEG)
    for value in ("-1", "nan", "inf"):
        case(cli, ["--warmup-epochs", value], "--warmup-epochs", NONNEG)
    for value in ("-0.05", "nan"):
        case(cli, ["--weight-decay", value], "--weight-decay", NONNEG)
    for value in ("-1", "0", "nan"):
        case(cli, ["--clip-grad", value], "--clip-grad", POS)
    case(cli, ["--max-bad-fraction", "1.5"], "--max-bad-fraction", "<= 1")
    case(cli, ["--skip-nonfinite", "-1"], "--skip-nonfinite", NONNEG)
    case(cli, ["--batch-size", "0"], "--batch-size", ONE)
    case(cli, ["--batch_size", "1.5"], "--batch-size", ONE)
    case(cli, ["--accum-iter", "0"], "--accum-iter", ONE)
    case(cli, ["--epochs", "-3"], "--epochs", ONE)
    case(cli, ["--max-steps", "0"], "--max-steps", ONE)
    case(cli, ["--num-workers", "-1"], "--num-workers", NONNEG)
    case(cli, ["--keep-checkpoints", "0"], "--keep-checkpoints", ONE)
    case(cli, ["--save-every-steps", "0"], "--save-every-steps", ONE)
    case(cli, ["--log-every", "0"], "--log-every", ONE)
    case(cli, ["--seed", "-1"], "--seed", NONNEG)
    case(cli, ["--in-chans", "0"], "--in-chans", ONE)
    case(cli, ["--in-chans", "65"], "--in-chans", "<= 64")
    case(cli, ["--input-size", "16"], "--input-size", ">= 32")
    case(cli, ["--amp", "fp8"], "--amp", "none, bf16, fp16")
    case(cli, ["--device", "foo"], "--device", "cpu, cuda or cuda:N")
    case(cli, ["--device", "cpu:0"], "--device", "cpu, cuda or cuda:N")
    case(cli, ["--mean", "0.5", "0.5", "--std", "0.2", "0.2", "0.2"], "--mean", "--in-chans is 3")
    case(cli, ["--mean", "0.5", "0.5", "0.5", "--std", "0.2", "0.2"], "--std", "--in-chans is 3")
    case(cli, ["--mean", "0.5", "0.5", "0.5", "--std", "0.2", "0", "0.2"], "--std", POS)
    case(cli, ["--mean", "0.5", "nan", "0.5", "--std", "0.2", "0.2", "0.2"], "--mean", "finite")
    case(cli, ["--mean", "0.5", "0.5", "0.5"], "--std")
    # YAML values of the wrong type (-c skips argparse's conversion; every value is checked again)
    case(cli, ["yaml:batch_size: 1.5"], "--batch-size", "integer", "1.5")
    case(cli, ["yaml:epochs: null"], "--epochs", "integer", ONE)
    case(cli, ["yaml:epochs: 2.5"], "--epochs", "integer", "2.5")
    case(cli, ["yaml:lr: .nan"], "--lr", POS)
    case(cli, ["yaml:blr: -0.001"], "--blr", POS)
    case(cli, ["yaml:weight_decay: [0.05]"], "--weight-decay", NONNEG)
    case(cli, ["yaml:warmup-epochs: true"], "--warmup-epochs", NONNEG)
    case(cli, ["yaml:clip_grad: 0"], "--clip-grad", POS)
    case(cli, ["yaml:num_workers: -2"], "--num-workers", NONNEG)
    case(cli, ["yaml:std: 0.2"], "--std", "list")
    case(cli, ["yaml:maks_ratio: 0.6"], "unknown keys: maks_ratio")
    case(cli, ["yaml:[1, 2]"], "mapping")
    case(cli, ["yaml:model: [atto"], "not valid YAML")
    case(cli, ["-c", "{root}/missing.yaml"], "{root}/missing.yaml", "no such file")
    # normalisation runs in float32: values float64 holds but float32 does not
    case(cli, ["--mean", "0.5", "0.5", "0.5", "--std", "1e-300", "0.2", "0.2"], "--std", "1e-300", "float32")
    case(cli, ["--mean", "1e300", "0", "0", "--std", "0.2", "0.2", "0.2"], "--mean", "float32")
    case(cli, ["--mean", "0", "0", "0", "--std", "1e39", "1", "1"], "--std", "float32")

for cli in ("pretrain", "finetune", "knn_eval", "visualize", "benchmark"):
    case(cli, ["--device", "cuda"], "--device", "CUDA is not available")
    case(cli, ["--device", "cuda:0"], "--device", "CUDA is not available")

# --- pretraining only
for value in ("0", "1", "-0.5", "nan", "1.5"):
    case("pretrain", ["--mask-ratio", value], "--mask-ratio", "> 0 and < 1")
case("pretrain", ["--decoder-dim", "0"], "--decoder-dim", ONE)
case("pretrain", ["--decoder-depth", "-1"], "--decoder-depth", ONE)
case("pretrain", ["--vis-every-epochs", "0"], "--vis-every-epochs", ONE)
case("pretrain", ["--knn-every-epochs", "-1"], "--knn-every-epochs", NONNEG)
case("pretrain", ["--knn-k", "0"], "--knn-k", ONE)
case("pretrain", ["--backend", "cuda"], "--backend", "sparse")
case("pretrain", ["--grn-stats", "global"], "--grn-stats", "sample")
case("pretrain", ["--model", "convnextv2_giant"], "convnextv2_giant", "convnextv2_atto")
case("pretrain", ["--input-size", "100"], "100x100", "32")
case("pretrain", ["--input-size", "64", "64", "64"], "--input-size", "one (square) or two")
case("pretrain", ["--show-channels", "0", "1"], "--show-channels")
case("pretrain", ["yaml:model: 123"], "--model", "string", "123")
case("pretrain", ["yaml:mask_ratio: [0.5]"], "--mask-ratio", "> 0 and < 1", "[0.5]")
case("pretrain", ["yaml:mask_ratio: 1.0"], "--mask-ratio", "> 0 and < 1")
case("pretrain", ["yaml:norm_pix_loss: 'yes'"], "--norm-pix-loss", "true or false", "'yes'")
case("pretrain", ["yaml:norm_pix_loss: 1"], "--norm-pix-loss", "true or false")
case("pretrain", ["yaml:decoder_dim: 0"], "--decoder-dim", ONE)
case("pretrain", ["--resume", "{root}/missing.pth"], "--resume", "not found")
case("pretrain", ["--resume", "{garbage}"], "not a PyTorch checkpoint")
case("pretrain", ["--output-dir", "{file}/out"], "is a file, not a folder")
case("pretrain", ["--output-dir", "/proc/fcmae_out"], "is not writable")

# --- fine-tuning only
for value in ("-0.1", "1", "nan"):
    case("finetune", ["--smoothing", value], "--smoothing", ">= 0 and < 1")
for value in ("-0.1", "1", "inf"):
    case("finetune", ["--drop-path", value], "--drop-path", ">= 0 and < 1")
for value in ("-0.1", "1.5", "nan"):
    case("finetune", ["--reprob", value], "--reprob", ">= 0 and <= 1")
case("finetune", ["--mixup", "-1"], "--mixup", NONNEG)
case("finetune", ["--cutmix", "nan"], "--cutmix", NONNEG)
case("finetune", ["--layer-decay", "0"], "--layer-decay", "> 0 and <= 1")
case("finetune", ["--layer-decay", "1.5"], "--layer-decay", "> 0 and <= 1")
case("finetune", ["--model-ema-decay", "1"], "--model-ema-decay", ">= 0 and < 1")
case("finetune", ["--label-fraction", "0"], "--label-fraction", "> 0 and <= 1")
case("finetune", ["--nb-classes", "0"], "--nb-classes", ONE)
case("finetune", ["--eval-every-epochs", "0"], "--eval-every-epochs", ONE)
case("finetune", ["--aa", "bogus-m9"], "--aa", "bogus-m9", "rand-m9-mstd0.5-inc1")
case("finetune", ["--aa", "rand-m9", "--in-chans", "1", "--mean", "0.5", "--std", "0.2"], "--aa none")
case("finetune", ["--layer-decay-type", "triple"], "--layer-decay-type", "single")
case("finetune", ["--train-subset", "5", "--label-fraction", "0.1"], "--train-subset", "--label-fraction")
case("finetune", ["--mixup", "0.8", "--batch-size", "7"], "--batch-size", "even")
case("finetune", ["--finetune", "{root}/missing.pth"], "--finetune", "not found")
case("finetune", ["--finetune", "{garbage}"], "not a PyTorch checkpoint")
case("finetune", ["--resume", "{ckpt}"], "not a fine-tuning checkpoint")
case("finetune", ["--eval", "--resume", "none"], "--eval", "--finetune")
case("finetune", ["yaml:drop_path: 1.0"], "--drop-path", ">= 0 and < 1")
case("finetune", ["yaml:model_ema: 'no'"], "--model-ema", "true or false")
case("finetune", ["yaml:model: 7"], "--model", "string")

# --- kNN evaluation
for value in ("0", "-1", "nan", "inf"):
    case("knn_eval", ["--temperature", value], "--temperature", POS)
case("knn_eval", ["--k", "0"], "--k", ONE)
case("knn_eval", ["--batch-size", "0"], "--batch-size", ONE)
case("knn_eval", ["--num-workers", "-1"], "--num-workers", NONNEG)
case("knn_eval", ["--device", "foo"], "--device", "cpu, cuda or cuda:N")
case("knn_eval", ["--input-size", "16"], "--input-size", ">= 32")
case("knn_eval", ["--label-fraction", "1.5"], "--label-fraction", "> 0 and <= 1")
case("knn_eval", ["--mean", "0.5", "--std", "0.2"], "--mean", "one per channel")
case("knn_eval", ["--mean", "0.5", "0.5", "0.5", "--std", "0.2", "0", "0.2"], "--std", POS)
case("knn_eval", ["--json", "/proc/knn.json"], "--json", "not writable")
case("knn_eval", ["--mean", "0.5", "0.5", "0.5", "--std", "0.2", "1e-40", "0.2"], "--std", "float32")

# --- reconstruction pictures
case("visualize", ["--device", "foo"], "--device", "cpu, cuda or cuda:N")
case("visualize", ["--num", "0"], "--num", ONE)
case("visualize", ["--mask-ratio", "1"], "--mask-ratio", "> 0 and < 1")
case("visualize", ["--mask-ratio", "nan"], "--mask-ratio", "> 0 and < 1")
case("visualize", ["--input-size", "100"], "100x100", "32")
case("visualize", ["--std", "0", "0", "0", "--mean", "0", "0", "0"], "--std", POS)
case("visualize", ["--mean", "0.5", "--std", "0.2"], "--mean", "3")
case("visualize", ["--out", "/proc/grid.png"], "--out", "not writable")

# --- checkpoint conversion
case("convert", ["{ckpt}", "{dir}", "--to", "reference"], "{dir}", "directory")
case("convert", ["{ckpt}", "{dir}", "--to", "timm"], "{dir}", "directory")
case("convert", ["{ckpt}", "{out}/x.pth", "--to", "timm", "--in-chans", "0"], "--in-chans", ONE)
case("convert", ["{ckpt}", "{out}/x.pth", "--to", "onnx"], "--to", "onnx")
case("convert", ["{ckpt}", "{out}/x.pth"], "--to")
case("convert", ["{root}/missing.pth", "{out}/x.pth", "--to", "timm"], "no such file or directory")
case("convert", ["{garbage}", "{out}/x.pth", "--to", "timm"], "not a PyTorch checkpoint")
case("convert", ["{ckpt}", "{file}/x.pth", "--to", "timm"], "cannot write")

# --- benchmarks: every check before the first measurement
case("benchmark", ["--threads", "-1"], "--threads", ONE)
case("benchmark", ["--threads", "0"], "--threads", ONE)
case("benchmark", ["--rounds", "0"], "--rounds", ONE)
case("benchmark", ["--in-chans", "0"], "--in-chans", ONE)
case("benchmark", ["--device", "foo"], "--device", "cpu, cuda or cuda:N")
case("benchmark", ["--amp", "fp16"], "--amp fp16", "cuda")
case("benchmark", ["--amp", "int8"], "--amp", "none, bf16, fp16")
case("benchmark", ["--json", "/proc/bench.json"], "--json", "not writable")
case("benchmark", ["--json", "{file}/sub/bench.json"], "--json", "is a file")
case("benchmark", ["--json", "{dir}"], "--json", "is a folder")
case("benchmark", ["--variants", "giant"], "giant")
case("benchmark", ["--input-sizes", "100"], "100")
case("benchmark", ["--input-sizes", "abc"], "--input-sizes", "abc")
case("benchmark", ["--batch-sizes", "0"], "--batch-sizes", ONE)
case("benchmark", ["--batch-sizes", "two"], "--batch-sizes", "two")
case("benchmark", ["--mask-ratios", "1.5"], "1.5")
case("bench_memory", ["--threads", "-1"], "--threads", ONE)
case("bench_memory", ["--limit-gib", "0"], "--limit-gib", POS)
case("bench_memory", ["--limit-gib", "nan"], "--limit-gib", POS)
case("bench_memory", ["--probe-batches", "0", "3"], "--probe-batches", ONE)
case("bench_memory", ["--probe-batches", "3", "1"], "--probe-batches", "SMALL < LARGER")
case("bench_memory", ["--input-size", "100"], "--input-size", "32")
case("bench_memory", ["--model", "convnextv2_giant"], "convnextv2_giant")
case("bench_memory", ["--json", "/proc/mem.json"], "--json", "not writable")

# --- data tools
case("data_stats", ["--in-chans", "0"], "--in-chans", ONE)
case("data_stats", ["--max-images", "0"], "--max-images", ONE)
case("data_stats", ["--num-workers", "-1"], "--num-workers", NONNEG)
case("data_stats", ["--max-bad-fraction", "2"], "--max-bad-fraction", "1")
case("data_stats", ["--out", "/proc/stats.yaml"], "not writable")
case("data_stats", ["--in-chans", "three"], "--in-chans", "three")
case("data_stats", [], "{six}", "channels 1, 2", "std 0")  # its green and blue are 0 in every image
case("make_shards", ["--shard-size", "lots"], "--shard-size", "lots")
case("make_shards", ["--shard-size", "0"], "--shard-size")
case("make_shards", ["--prefix", "a/b"], "--prefix")
case("feature_diversity", ["--images", "0"], "--images", ONE)
case("feature_diversity", ["--input-size", "16"], "--input-size", "32")
case("feature_diversity", ["--images", "x"], "--images", "x")
case("feature_diversity", ["--json", "/proc/fd.json"], "not writable")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Real inputs to get wrong: a pretraining checkpoint (the tiny test variant), garbage, folders of images."""
    root = tmp_path_factory.mktemp("inputs")
    pretrain_main(TINY_PRETRAIN + ["--input-size", "64", "--batch-size", "4", "--max-steps", "1",
                                   "--warmup-epochs", "0", "--num-workers", "0", "--knn-every-epochs", "0",
                                   "--output-dir", str(root / "pre")])
    (root / "garbage.pth").write_bytes(b"not a checkpoint at all")
    (root / "a_file").write_text("")
    write_small_folders(root)
    return {"ckpt": str(root / "pre" / "checkpoint-00000001.pth"), "garbage": str(root / "garbage.pth"),
            "file": str(root / "a_file"), "six": str(root / "six"), "pets": str(root / "pets"), "root": str(root)}


def invocation(cli, args, files, tmp_path):
    """argv for the row, with placeholders filled and `yaml:` rows written to a config file."""
    out, folder = tmp_path / "out", tmp_path / "existing"
    folder.mkdir()
    names = dict(files, out=str(out), dir=str(folder))
    base, argv = list(BASE[cli]), []
    for a in args:
        if a.startswith("yaml:") and ":" in a[5:]:
            flag = "--" + a[5:].split(":")[0].strip().replace("_", "-")
            if flag in base:
                del base[base.index(flag):base.index(flag) + 2]
    for a in base + args:
        if a.startswith("yaml:"):
            (tmp_path / "config.yaml").write_text(a[5:] + "\n")
            argv += ["-c", str(tmp_path / "config.yaml")]
        else:
            argv.append(a.format(**names))
    return argv, names, out, folder


def check_clean(code, err, expect, names, out, folder):
    lines = err.strip().splitlines()
    assert code == 2, f"exit code {code}: {err[-3000:]}"
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one `error:` line:\n{err}"
    for part in expect:
        assert part.format(**names) in lines[0], f"{part!r} not in {lines[0]!r}"
    assert not out.exists(), f"something was written: {sorted(os.listdir(out))}"
    assert not os.listdir(folder), "something was written into the existing folder"


@pytest.mark.parametrize("cli,args,expect", CASES, ids=[f"{c[0]}-{i}-{' '.join(c[1])[:40]}" for i, c in
                                                          enumerate(CASES)])
def test_bad_invocation(tmp_path, files, capsys, cli, args, expect):
    argv, names, out, folder = invocation(cli, args, files, tmp_path)
    capsys.readouterr()
    t0 = time.perf_counter()
    code = _code(CLIS[cli][0], argv)
    seconds = time.perf_counter() - t0
    check_clean(code, capsys.readouterr().err, expect, names, out, folder)
    if cli in ("benchmark", "bench_memory"):  # before any measurement: no model built, no process started
        assert seconds < 1.0, f"{seconds:.2f} s to reject {args}"


def test_the_table_covers_every_cli():
    counts = {cli: sum(c[0] == cli for c in CASES) for cli in CLIS}
    assert all(counts.values()), counts
    assert len(CASES) >= 200, len(CASES)


# one row per CLI as a real process: stderr is exactly the one line (no warnings, no usage dump)
PROCESS_ROWS = [
    ("pretrain", ["--lr", "nan"], ["--lr", POS]),
    ("pretrain", ["yaml:epochs: null"], ["--epochs"]),
    ("finetune", ["--smoothing", "1"], ["--smoothing", ">= 0 and < 1"]),
    ("knn_eval", ["--temperature", "0"], ["--temperature", POS]),
    ("convert", ["{ckpt}", "{dir}", "--to", "reference"], ["{dir}"]),
    ("benchmark", ["--json", "/proc/bench.json"], ["--json"]),
    ("bench_memory", ["--threads", "-1"], ["--threads"]),
]


@pytest.mark.parametrize("cli,args,expect", PROCESS_ROWS, ids=[r[0] for r in PROCESS_ROWS])
def test_bad_invocation_as_a_process(tmp_path, files, cli, args, expect):
    argv, names, out, folder = invocation(cli, args, files, tmp_path)
    res = subprocess.run([sys.executable, "-m", CLIS[cli][1]] + argv, cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    check_clean(res.returncode, res.stderr, expect, names, out, folder)
