"""Layer ids, lr scales and weight-decay groups of finetune/layer_decay.py against hand-computed tables
(the reference's get_num_layer_for_convnext_single / get_num_layer_for_convnext on its own names)."""
import pytest
import timm
import torch
from timm.scheduler import CosineLRScheduler

from finetune.layer_decay import layer_id, lr_scale, no_weight_decay, num_layers, param_groups

ATTO, BASE, TEST = (2, 2, 6, 2), (3, 3, 27, 3), (1, 1, 2, 1)

# Written out by hand, one entry per module prefix, so the tables do not share the code's arithmetic.
ATTO_SINGLE = {
    "stem": 1, "stages.0.blocks.0": 1, "stages.0.blocks.1": 2,
    "stages.1.downsample": 3, "stages.1.blocks.0": 3, "stages.1.blocks.1": 4,
    "stages.2.downsample": 5, "stages.2.blocks.0": 5, "stages.2.blocks.1": 6, "stages.2.blocks.2": 7,
    "stages.2.blocks.3": 8, "stages.2.blocks.4": 9, "stages.2.blocks.5": 10,
    "stages.3.downsample": 11, "stages.3.blocks.0": 11, "stages.3.blocks.1": 12,
    "head.norm": 13, "head.fc": 13,
}
ATTO_GROUP = {
    "stem": 0, "stages.0.blocks.0": 1, "stages.0.blocks.1": 1,
    "stages.1.downsample": 2, "stages.1.blocks.0": 2, "stages.1.blocks.1": 2,
    "stages.2.downsample": 3, "stages.2.blocks.0": 3, "stages.2.blocks.1": 3, "stages.2.blocks.2": 3,
    "stages.2.blocks.3": 4, "stages.2.blocks.4": 4, "stages.2.blocks.5": 4,
    "stages.3.downsample": 12, "stages.3.blocks.0": 12, "stages.3.blocks.1": 12,
    "head.norm": 13, "head.fc": 13,
}
TEST_SINGLE = {  # the tiny test variant: one block per stage but two in stage 2
    "stem": 1, "stages.0.blocks.0": 1, "stages.1.downsample": 2, "stages.1.blocks.0": 2,
    "stages.2.downsample": 3, "stages.2.blocks.0": 3, "stages.2.blocks.1": 4,
    "stages.3.downsample": 5, "stages.3.blocks.0": 5, "head.norm": 6, "head.fc": 6,
}
TEST_GROUP = {
    "stem": 0, "stages.0.blocks.0": 1, "stages.1.downsample": 2, "stages.1.blocks.0": 2,
    "stages.2.downsample": 3, "stages.2.blocks.0": 3, "stages.2.blocks.1": 3,
    "stages.3.downsample": 12, "stages.3.blocks.0": 12, "head.norm": 13, "head.fc": 13,
}
BASE_SINGLE = {
    "stem": 1, "stages.0.blocks.0": 1, "stages.0.blocks.1": 2, "stages.0.blocks.2": 3,
    "stages.1.downsample": 4, "stages.1.blocks.0": 4, "stages.1.blocks.1": 5, "stages.1.blocks.2": 6,
    "stages.2.downsample": 7, **{f"stages.2.blocks.{j}": 7 + j for j in range(27)},  # 7 .. 33
    "stages.3.downsample": 34, "stages.3.blocks.0": 34, "stages.3.blocks.1": 35, "stages.3.blocks.2": 36,
    "head.norm": 37, "head.fc": 37,
}
BASE_GROUP = {
    "stem": 0, "stages.0.blocks.0": 1, "stages.0.blocks.1": 1, "stages.0.blocks.2": 1,
    "stages.1.downsample": 2, "stages.1.blocks.0": 2, "stages.1.blocks.1": 2, "stages.1.blocks.2": 2,
    "stages.2.downsample": 3,
    # stage-2 blocks in threes: 0-2 -> 3, 3-5 -> 4, ..., 24-26 -> 11
    **{f"stages.2.blocks.{j}": g for g, first in zip(range(3, 12), range(0, 27, 3)) for j in range(first, first + 3)},
    "stages.3.downsample": 12, "stages.3.blocks.0": 12, "stages.3.blocks.1": 12, "stages.3.blocks.2": 12,
    "head.norm": 13, "head.fc": 13,
}


@pytest.fixture(scope="module")
def models():
    with torch.device("meta"):  # names and shapes only: base costs nothing to build
        return {d: timm.create_model(name, num_classes=10)
                for d, name in [(ATTO, "convnextv2_atto"), (BASE, "convnextv2_base"), (TEST, "convnextv2_test")]}


def module_of(name: str) -> str:
    for prefix in sorted(set(ATTO_SINGLE) | set(BASE_SINGLE), key=len, reverse=True):
        if name.startswith(prefix + "."):
            return prefix
    raise AssertionError(f"no table entry for {name}")


@pytest.mark.parametrize("depths,mode,table,total", [
    (ATTO, "single", ATTO_SINGLE, 12), (ATTO, "group", ATTO_GROUP, 12),
    (BASE, "single", BASE_SINGLE, 36), (BASE, "group", BASE_GROUP, 12),
    (TEST, "single", TEST_SINGLE, 5), (TEST, "group", TEST_GROUP, 12),
])
def test_layer_ids(models, depths, mode, table, total):
    names = [n for n, _ in models[depths].named_parameters()]
    seen = set()
    for name in names:
        prefix = module_of(name)
        seen.add(prefix)
        assert layer_id(name, mode, depths) == table[prefix], name
    assert seen == set(table)  # every table row matched a real parameter: the table is complete
    assert num_layers(mode, depths) == total


def test_lr_scales():
    assert lr_scale(13, 0.9, 12) == 1.0  # the head is not decayed
    assert lr_scale(1, 0.9, 12) == pytest.approx(0.9 ** 12)  # atto stem
    assert lr_scale(0, 0.6, 12) == pytest.approx(0.6 ** 13)  # group mode stem
    assert lr_scale(37, 0.9, 36) == 1.0 and lr_scale(1, 0.9, 36) == pytest.approx(0.9 ** 36)


def test_no_weight_decay_rule(models):
    decayed = {n for n, p in models[ATTO].named_parameters() if not no_weight_decay(n, p)}
    # exactly the conv / linear kernels: stem, downsample convs, depthwise convs, both MLP layers, classifier
    expected = {"stem.0.weight", "head.fc.weight"}
    expected |= {f"stages.{i}.downsample.1.weight" for i in (1, 2, 3)}
    expected |= {f"stages.{i}.blocks.{j}.{m}.weight" for i, d in enumerate(ATTO) for j in range(d)
                 for m in ("conv_dw", "mlp.fc1", "mlp.fc2")}
    assert decayed == expected
    assert not any(".grn." in n or n.endswith(".bias") for n in decayed)


@pytest.mark.parametrize("mode,ld", [("single", 0.9), ("group", 0.6)])
def test_param_groups(mode, ld):
    model = timm.create_model("convnextv2_atto", num_classes=10)
    groups = param_groups(model, ATTO, weight_decay=0.05, layer_decay=ld, layer_decay_type=mode)
    table = ATTO_SINGLE if mode == "single" else ATTO_GROUP
    total = num_layers(mode, ATTO)
    params = dict(model.named_parameters())
    listed = [n for g in groups for n in g["param_names"]]
    assert sorted(listed) == sorted(params)  # every parameter exactly once
    for g in groups:
        assert len(g["params"]) == len(g["param_names"])
        for name, p in zip(g["param_names"], g["params"]):
            assert p is params[name]
            assert g["lr_scale"] == pytest.approx(ld ** (total + 1 - table[module_of(name)])), name
            assert g["weight_decay"] == (0.0 if no_weight_decay(name, p) else 0.05), name


def test_scheduler_applies_lr_scale():
    """timm's scheduler multiplies each group's scheduled lr by its lr_scale; the optimiser keeps the groups."""
    from timm.optim import create_optimizer_v2

    model = timm.create_model("convnextv2_atto", num_classes=10)
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05,
                              param_group_fn=lambda m: param_groups(m, ATTO, 0.05, 0.9, "single"))
    sched = CosineLRScheduler(opt, t_initial=100, lr_min=0.0, t_in_epochs=False)
    sched.step_update(0)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])
    stem = next(g for g in opt.param_groups if "stem.0.weight" in g["param_names"])
    assert stem["lr"] == pytest.approx(1e-3 * 0.9 ** 12) and stem["weight_decay"] == 0.05
