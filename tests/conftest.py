import importlib.util

import pytest
import torch

HAS_MINKOWSKI = importlib.util.find_spec("MinkowskiEngine") is not None


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow (huge model etc.)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes-long test (huge model); run with --runslow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow; run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def randomize_grn(model, std=0.5, seed=0):
    """GRN gamma/beta start at zero, which would hide GRN bugs: give them random non-zero values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".grn." in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model
