import importlib.util
import os

# One OpenMP thread for the whole session, set before torch starts (unless OMP_NUM_THREADS is already set; child
# processes inherit it): the tests' operations are small, and on the shared 2-core machine a second thread stalls
# them (test_agreement: 229 s on two threads, 14 s on one, at load 2). torch.set_num_threads(1) in a fixture is not
# enough: MinkowskiEngine sets OpenMP's thread count to this variable (else the CPU count) for every coordinate map.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import models.test_variant  # noqa: E402,F401  (timm can build the tiny test variant in every test module)

HAS_MINKOWSKI = importlib.util.find_spec("MinkowskiEngine") is not None
# The tiny test variant (models/variants.py): atto's architecture at a fraction of its cost, for every test that
# does not need a real variant's shapes.
TINY = "convnextv2_test"
# pretraining CLI arguments for the tiny variant with a small decoder (the default 512-dim decoder would be most
# of the model and of every checkpoint)
TINY_PRETRAIN = ["--model", TINY, "--decoder-dim", "64"]
# fine-tuning kept tiny and fast: the tiny variant at 32x32, a few hundred Fashion-MNIST images, no worker processes
FAST_FINETUNE = ["--model", TINY, "--input-size", "32", "--batch-size", "32", "--num-workers", "0",
                 "--val-subset", "200", "--log-every", "5"]


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow (huge model etc.)")
    parser.addoption("--cuda-dry-run", action="store_true", default=False,
                     help="run the cuda-marked tests on the CPU at toy sizes (tools/gpu_check.sh --dry-run)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes-long test (huge model); run with --runslow")
    config.addinivalue_line("markers", "cuda: needs a GPU (tools/gpu_check.sh); on the CPU only with --cuda-dry-run")


@pytest.fixture(scope="session")
def gpu(request):
    """The CUDA device for cuda-marked tests; the CPU with --cuda-dry-run; else the test is skipped."""
    if request.config.getoption("--cuda-dry-run"):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (tools/gpu_check.sh runs these on a GPU; --cuda-dry-run on the CPU)")
    return torch.device("cuda")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow; run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def write_small_folders(root):
    """root/six: six unlabelled 40x40 photos; root/pets/{train,val}/{cat,dog}: four labelled ones per class and split
    (the inputs of the command-line refusal tables)."""
    from PIL import Image

    (root / "six").mkdir()
    for i in range(6):
        Image.new("RGB", (40, 40), (i * 40, 0, 0)).save(root / "six" / f"{i}.png")
    for split in ("train", "val"):
        for c, level in (("cat", 30), ("dog", 220)):
            (root / "pets" / split / c).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (40, 40), (level, level - i, 0)).save(root / "pets" / split / c / f"{i}.png")


def randomize_grn(model, std=0.5, seed=0):
    """GRN gamma/beta start at zero, which would hide GRN bugs: give them random non-zero values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".grn." in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


@pytest.fixture(scope="module")
def one_thread():
    """For modules of many small in-process runs (`pytestmark = pytest.mark.usefixtures("one_thread")`): the test
    machine's cores are shared, and one thread avoids oversubscription stalls that cost 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def pretrain_run(tmp_path_factory):
    """(output dir, checkpoint) of the pretraining CLI: 2 steps without warm-up, so Adam's first steps move every
    tensor (GRN included) by about the lr away from its initial value."""
    from fcmae.pretrain.cli import main as pretrain

    out = tmp_path_factory.mktemp("pretrain")
    pretrain(TINY_PRETRAIN + ["--input-size", "64", "--batch-size", "8", "--max-steps", "2", "--lr", "1e-3",
                              "--warmup-epochs", "0", "--num-workers", "0", "--knn-every-epochs", "0",
                              "--output-dir", str(out)])
    return out, str(out / "checkpoint-00000002.pth")
