"""Checkpoint conversion: bit-exact round trips, strict loading into timm / Hugging Face with equal outputs,
the reference MinkowskiEngine layout checked against an independent test-side implementation, and a
one-line error for every bad input."""
import argparse
import importlib.util
import json
import os
import pickle
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is built locally

from fcmae.runtime.checkpoint_file import read_checkpoint  # noqa: E402
from fcmae.runtime.errors import CheckpointError  # noqa: E402
from models import convert as conversions  # noqa: E402
from models import create_fcmae  # noqa: E402
from models.convert import (  # noqa: E402
    FINETUNE_FORMAT,
    PRETRAIN_FORMAT,
    ConversionError,
    adapt_in_chans,
    detect_layout,
    load_into_timm,
    to_canonical,
)
from models.me_layout import conv_weight, depthwise_weight  # noqa: E402
from fcmae.tools.convert import main  # noqa: E402
from tests.conftest import TINY  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# models.convert is pure (state dicts and containers in, state dicts out); these read a path first, as the CLIs do
def _read(source):
    return read_checkpoint(source) if isinstance(source, (str, os.PathLike)) else source


def to_timm(source, *args, **kwargs):
    return conversions.to_timm(_read(source), *args, **kwargs)


def convert(source, *args, **kwargs):
    return conversions.convert(_read(source), *args, **kwargs)


def in_chans_of(source, *args, **kwargs):
    return conversions.in_chans_of(_read(source), *args, **kwargs)
# real variants of both MLP families (conv-MLP: 1x1 conv fc; Linear-MLP), for the layouts of released checkpoints,
# and the test variant the other test modules convert
MODELS = ["convnextv2_atto", "convnextv2_tiny", TINY]
NUM_CLASSES = 10
HEAD_KEYS = {"head.norm.weight", "head.norm.bias", "head.fc.weight", "head.fc.bias"}


def built(factory, *args, **kwargs):
    """Build on the meta device and allocate without running the init (seconds for tiny on a busy CPU):
    every tensor is then set by `randomized` or by a strict load."""
    with torch.device("meta"):
        model = factory(*args, **kwargs)
    return model.to_empty(device="cpu").eval()


def randomized(model, seed):
    """Non-trivial values everywhere (GRN and biases start at zero, LayerNorm at one) so that a swapped,
    transposed or dropped tensor cannot go unnoticed; scales stay realistic so outputs stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if ".grn." in name:
                p.copy_(0.5 * noise)
            elif p.dim() == 1 and name.endswith("weight"):  # LayerNorm weights
                p.copy_(1 + 0.05 * noise)
            else:
                p.copy_(0.05 * noise)
    return model


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Per variant: our pretraining checkpoint (FCMAE with decoder) and fine-tune checkpoint (timm + EMA)."""
    root = tmp_path_factory.mktemp("sources")
    out = {}
    for i, name in enumerate(MODELS):
        fcmae = randomized(built(create_fcmae, name, backend="dense"), seed=10 + i)
        clf = randomized(built(timm.create_model, name, num_classes=NUM_CLASSES), seed=20 + i)
        ema = {k: v + 1 for k, v in clf.state_dict().items()}
        pre, fin = root / f"{name}_pretrain.pth", root / f"{name}_finetune.pth"
        torch.save({"format": PRETRAIN_FORMAT, "model_name": name, "model": fcmae.state_dict(), "epoch": 7,
                    "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]}}, pre)
        torch.save({"format": FINETUNE_FORMAT, "model_name": name, "model": clf.state_dict(), "model_ema": ema,
                    "epoch": 3}, fin)
        out[name] = {"fcmae": fcmae, "clf": clf, "pretrain": pre, "finetune": fin, "ema": ema}
    return out


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    """converted(name, source, to) -> path written by the CLI (cached: each conversion runs once)."""
    root = tmp_path_factory.mktemp("converted")
    cache = {}

    def get(name, source, to, back=False):
        key = (name, source, to, back)
        if key not in cache:
            src = get(name, source, to) if back else sources[name][source]
            suffix = {"timm": ".safetensors", "hf": ""}.get(to, ".pth")
            dst = root / f"{name}_{source}_{to}{'_back' if back else ''}{suffix if not back else '.pth'}"
            assert main([str(src), str(dst), "--to", "ours" if back else to]) == 0
            cache[key] = dst
        return cache[key]

    return get


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same(actual: dict, expected: dict):
    assert set(actual) == set(expected), set(actual) ^ set(expected)
    for k, v in expected.items():
        assert actual[k].dtype == v.dtype and actual[k].shape == v.shape and torch.equal(actual[k], v), k


def encoder_part(fcmae_sd):
    return {k[len("encoder."):]: v for k, v in fcmae_sd.items() if k.startswith("encoder.")}


# ------------------------------------------------------------------------------------------------
# Round trips through the tool: ours -> X -> ours


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("to", ["timm", "hf", "reference"])
def test_finetune_round_trip_is_bit_exact(sources, converted, name, to):
    back = load(converted(name, "finetune", to, back=True))
    assert back["format"] == FINETUNE_FORMAT and back["model_name"] == name
    assert_same(back["model"], sources[name]["clf"].state_dict())


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("to", ["timm", "hf", "reference"])
def test_pretrain_round_trip_is_bit_exact(sources, converted, name, to):
    fcmae_sd = sources[name]["fcmae"].state_dict()
    back = load(converted(name, "pretrain", to, back=True))
    assert back["model_name"] == name
    if to == "reference":  # the MinkowskiEngine pretraining layout holds the decoder too
        assert back["format"] == PRETRAIN_FORMAT
        assert_same(back["model"], fcmae_sd)
        built(create_fcmae, name).load_state_dict(back["model"], strict=True)
        return
    assert back["format"] == FINETUNE_FORMAT  # the decoder cannot travel through timm / Hugging Face
    encoder = back["model"]
    if to == "hf":  # ConvNextV2Model's final LayerNorm comes back at its initial value
        c4 = encoder["head.norm.weight"].shape[0]
        assert torch.equal(encoder.pop("head.norm.weight"), torch.ones(c4))
        assert torch.equal(encoder.pop("head.norm.bias"), torch.zeros(c4))
    assert_same(encoder, encoder_part(fcmae_sd))


# ------------------------------------------------------------------------------------------------
# timm and Hugging Face load the outputs strictly and compute what ours computes


def hf_load(cls, path):
    model, info = cls.from_pretrained(path, output_loading_info=True)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    assert not problems, problems
    return model.eval()


MAX_DIFF = {}  # measured differences, printed by the last test (run pytest with -s to see them)


@pytest.mark.parametrize("name", MODELS)
def test_logits_agree_ours_timm_hf(sources, converted, name):
    transformers = pytest.importorskip("transformers")
    ours = sources[name]["clf"]
    timm_model = built(timm.create_model, name, num_classes=NUM_CLASSES)
    timm_model.load_state_dict(load_file(converted(name, "finetune", "timm")), strict=True)  # strict: all keys
    hf = hf_load(transformers.ConvNextV2ForImageClassification, converted(name, "finetune", "hf"))
    assert hf.config.num_labels == NUM_CLASSES and hf.config.layer_norm_eps == 1e-6
    imgs = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, t, h = ours(imgs), timm_model(imgs), hf(pixel_values=imgs).logits
    MAX_DIFF[f"{name} logits timm-ours (max |logit| {ref.abs().max().item():.2f})"] = (t - ref).abs().max().item()
    MAX_DIFF[f"{name} logits hf-ours"] = (h - ref).abs().max().item()
    MAX_DIFF[f"{name} logits hf-timm"] = (h - t).abs().max().item()
    assert ref.abs().max() > 0.1  # a meaningful comparison, not of near-zero logits
    assert torch.allclose(t, ref, atol=1e-5, rtol=0) and torch.allclose(h, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_encoder_features_agree_ours_timm_hf(sources, converted, name):
    """Encoder-only (pretraining) weights: our encoder with nothing masked, timm's forward_features and
    Hugging Face's ConvNextV2Model last_hidden_state."""
    transformers = pytest.importorskip("transformers")
    timm_model = built(timm.create_model, name, num_classes=NUM_CLASSES)  # forward_features: no head
    result = timm_model.load_state_dict(load_file(converted(name, "pretrain", "timm")), strict=False)
    assert set(result.missing_keys) == HEAD_KEYS and not result.unexpected_keys  # only the head is missing
    hf = hf_load(transformers.ConvNextV2Model, converted(name, "pretrain", "hf"))
    imgs = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = sources[name]["fcmae"].encoder(imgs, torch.zeros(2, 2 * 3))
        t, h = timm_model.forward_features(imgs), hf(pixel_values=imgs).last_hidden_state
    scale = ours.abs().max().item()
    MAX_DIFF[f"{name} features timm-ours (max |x| {scale:.1f})"] = (t - ours).abs().max().item()
    MAX_DIFF[f"{name} features hf-ours"] = (h - ours).abs().max().item()
    assert torch.allclose(t, ours, atol=1e-5 * scale, rtol=0) and torch.allclose(h, ours, atol=1e-5 * scale, rtol=0)


# ------------------------------------------------------------------------------------------------
# The reference MinkowskiEngine pretraining layout, built independently from its documentation


def reference_minkowski_from_ours(fcmae_sd):
    """Test-side implementation of the documented layout, key by key, kernels element by element:
    conv kernels (k*k, in, out) and depthwise kernels (k*k, C) with K[h + k*w] = W[..., h, w];
    biases and GRN (1, C); `.ln` / `.linear` wrappers; the dense reference decoder block."""

    def me_kernel(w):
        k = w.shape[-1]
        out = torch.empty(k * k, w.shape[1], w.shape[0]) if w.shape[1] > 1 else torch.empty(k * k, w.shape[0])
        for h in range(k):
            for x in range(k):
                out[h + k * x] = w[:, :, h, x].t() if w.shape[1] > 1 else w[:, 0, h, x]
        return out

    row = lambda t: t.reshape(1, -1)  # noqa: E731
    flat = lambda t: t.reshape(t.shape[0], t.shape[1])  # noqa: E731
    rules = [  # (pattern on our key, replacement, tensor transform)
        (r"encoder\.stem\.(\d)\.", r"encoder.downsample_layers.0.\1.", None),
        (r"encoder\.stages\.(\d)\.downsample\.0\.", r"encoder.downsample_layers.\1.0.ln.", None),
        (r"encoder\.stages\.(\d)\.downsample\.1\.weight", r"encoder.downsample_layers.\1.1.kernel", me_kernel),
        (r"encoder\.stages\.(\d)\.downsample\.1\.bias", r"encoder.downsample_layers.\1.1.bias", row),
        (r"encoder\.stages\.(\d)\.blocks\.(\d+)\.conv_dw\.weight", r"encoder.stages.\1.\2.dwconv.kernel", me_kernel),
        (r"encoder\.stages\.(\d)\.blocks\.(\d+)\.conv_dw\.bias", r"encoder.stages.\1.\2.dwconv.bias", row),
        (r"encoder\.stages\.(\d)\.blocks\.(\d+)\.norm\.", r"encoder.stages.\1.\2.norm.ln.", None),
        (r"encoder\.stages\.(\d)\.blocks\.(\d+)\.mlp\.fc(\d)\.weight", r"encoder.stages.\1.\2.pwconv\3.linear.weight", flat),
        (r"encoder\.stages\.(\d)\.blocks\.(\d+)\.mlp\.fc(\d)\.bias", r"encoder.stages.\1.\2.pwconv\3.linear.bias", None),
        (r"encoder\.stages\.(\d)\.blocks\.(\d+)\.mlp\.grn\.weight", r"encoder.stages.\1.\2.grn.gamma", row),
        (r"encoder\.stages\.(\d)\.blocks\.(\d+)\.mlp\.grn\.bias", r"encoder.stages.\1.\2.grn.beta", row),
        (r"decoder\.(\d)\.conv_dw\.", r"decoder.\1.dwconv.", None),
        (r"decoder\.(\d)\.mlp\.fc(\d)\.", r"decoder.\1.pwconv\2.", None),
        (r"decoder\.(\d)\.mlp\.grn\.weight", r"decoder.\1.grn.gamma", lambda t: t.reshape(1, 1, 1, -1)),
        (r"decoder\.(\d)\.mlp\.grn\.bias", r"decoder.\1.grn.beta", lambda t: t.reshape(1, 1, 1, -1)),
    ]
    out = {}
    for key, value in fcmae_sd.items():
        for pattern, repl, fn in rules:
            if re.match(pattern, key):
                key, value = re.sub(pattern, repl, key), (fn(value) if fn else value)
                break
        out[key] = value
    return out


def reference_remap(me_sd):
    """The reference's own loader formula (utils.remap_checkpoint_keys, restated): kernel.permute(2, 1, 0)
    .reshape(out, in, k, k).transpose(3, 2), depthwise likewise; used here only to cross-check our reading."""
    out = {}
    for key, v in me_sd.items():
        if key.endswith(".kernel") and v.dim() == 3:
            k = int(v.shape[0] ** 0.5)
            out[key] = v.permute(2, 1, 0).reshape(v.shape[2], v.shape[1], k, k).transpose(3, 2)
        elif key.endswith(".kernel"):
            k = int(v.shape[0] ** 0.5)
            out[key] = v.permute(1, 0).reshape(v.shape[1], 1, k, k).transpose(3, 2)
    return out


@pytest.fixture(scope="module")
def reference_checkpoint(sources, tmp_path_factory):
    """A synthetic reference pretraining checkpoint as main_pretrain.py saves it (args is a Namespace)."""
    me = reference_minkowski_from_ours(sources["convnextv2_atto"]["fcmae"].state_dict())
    path = tmp_path_factory.mktemp("reference") / "checkpoint-799.pth"
    torch.save({"model": me, "epoch": 799, "scaler": {"scale": 65536.0},
                "args": argparse.Namespace(model="convnextv2_atto", mask_ratio=0.6, input_size=224)}, path)
    return me, path


def test_reference_minkowski_checkpoint_converts_exactly(sources, reference_checkpoint, tmp_path):
    me, path = reference_checkpoint
    assert detect_layout(read_checkpoint(path)) == "reference-minkowski"
    out = tmp_path / "ours.pth"
    assert main([str(path), str(out), "--to", "ours"]) == 0
    back = load(out)
    assert back["format"] == PRETRAIN_FORMAT and back["model_name"] == "convnextv2_atto"
    assert_same(back["model"], sources["convnextv2_atto"]["fcmae"].state_dict())
    # ours -> reference writes exactly the documented layout
    out = tmp_path / "reference.pth"
    assert main([str(sources["convnextv2_atto"]["pretrain"]), str(out), "--to", "reference"]) == 0
    assert_same(load(out)["model"], me)


def test_reading_agrees_with_the_reference_remap_formula(reference_checkpoint):
    me, path = reference_checkpoint
    _, timm_sd = to_timm(path)
    remapped = reference_remap(me)
    assert len(remapped) == 3 + 12  # three downsampling convs, twelve depthwise convs
    for key, dense in remapped.items():
        m = re.match(r"encoder\.(downsample_layers\.(\d)\.1|stages\.(\d)\.(\d+)\.dwconv)\.kernel", key)
        timm_key = (f"stages.{m.group(2)}.downsample.1.weight" if m.group(2)
                    else f"stages.{m.group(3)}.blocks.{m.group(4)}.conv_dw.weight")
        assert torch.equal(timm_sd[timm_key], dense), key


def me_depthwise(x, kernel, bias):
    """MinkowskiEngine semantics on a full grid: out[u] = b + sum_offsets K[h + k*w] * x[u + (h, w) - k//2]."""
    k = int(kernel.shape[0] ** 0.5)
    xp = F.pad(x, [k // 2] * 4)
    out = bias.reshape(1, -1, 1, 1).expand_as(x).clone()
    for h in range(k):
        for w in range(k):
            out += kernel[h + k * w].reshape(1, -1, 1, 1) * xp[:, :, h:h + x.shape[2], w:w + x.shape[3]]
    return out


def me_strided(x, kernel, bias):
    """MinkowskiEngine even kernel, stride k: out[u] = b + sum_{h, w in [0, k)} x[k*u + (h, w)] @ K[h + k*w]."""
    k = int(kernel.shape[0] ** 0.5)
    out = bias.reshape(1, -1, 1, 1)
    for h in range(k):
        for w in range(k):
            out = out + torch.einsum("nihw,io->nohw", x[:, :, h::k, w::k], kernel[h + k * w])
    return out


def test_converted_dense_convs_reproduce_minkowski_kernels(reference_checkpoint):
    me, path = reference_checkpoint
    _, timm_sd = to_timm(path, "convnextv2_atto")
    x = torch.randn(2, 80, 12, 14, generator=torch.Generator().manual_seed(2))
    kernel, bias = me["encoder.stages.1.0.dwconv.kernel"], me["encoder.stages.1.0.dwconv.bias"]
    dense = F.conv2d(x, timm_sd["stages.1.blocks.0.conv_dw.weight"], timm_sd["stages.1.blocks.0.conv_dw.bias"],
                     padding=3, groups=80)
    assert torch.allclose(dense, me_depthwise(x, kernel, bias), atol=1e-5)
    x = torch.randn(2, 80, 12, 14, generator=torch.Generator().manual_seed(3))
    kernel, bias = me["encoder.downsample_layers.2.1.kernel"], me["encoder.downsample_layers.2.1.bias"]
    dense = F.conv2d(x, timm_sd["stages.2.downsample.1.weight"], timm_sd["stages.2.downsample.1.bias"], stride=2)
    assert torch.allclose(dense, me_strided(x, kernel, bias), atol=1e-5)


HAS_MINKOWSKI = importlib.util.find_spec("MinkowskiEngine") is not None


@pytest.mark.skipif(not HAS_MINKOWSKI, reason="MinkowskiEngine not installed (tools/setup.sh builds it)")
def test_minkowski_layers_match_converted_dense_convs():
    """MinkowskiEngine itself, on a full grid, with kernels in the reference layout."""
    from models.minkowski_compat import import_minkowski

    ME = import_minkowski()
    g = torch.Generator().manual_seed(4)
    n, c, cout, hh, ww = 1, 6, 5, 8, 10
    x = torch.randn(n, c, hh, ww, generator=g)
    rows, cols = torch.meshgrid(torch.arange(hh), torch.arange(ww), indexing="ij")
    coords = torch.stack([torch.zeros(hh * ww, dtype=torch.long), rows.flatten(), cols.flatten()], 1).int()
    st = ME.SparseTensor(x[0].permute(1, 2, 0).reshape(-1, c), coordinates=coords)

    def densify(out, stride, channels):
        res = torch.zeros(1, channels, hh // stride, ww // stride)
        cc = out.C.long()
        res[0, :, cc[:, 1] // stride, cc[:, 2] // stride] = out.F.t()
        return res

    dw = ME.MinkowskiChannelwiseConvolution(c, kernel_size=7, bias=True, dimension=2)
    conv = ME.MinkowskiConvolution(c, cout, kernel_size=2, stride=2, bias=True, dimension=2)
    with torch.no_grad():
        for layer in (dw, conv):
            layer.kernel.copy_(torch.randn(layer.kernel.shape, generator=g))
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))
        expect_dw = F.conv2d(x, depthwise_weight(dw.kernel, 7), dw.bias.flatten(), padding=3, groups=c)
        expect_conv = F.conv2d(x, conv_weight(conv.kernel, 2), conv.bias.flatten(), stride=2)
        assert torch.allclose(densify(dw(st), 1, c), expect_dw, atol=1e-5)
        assert torch.allclose(densify(conv(st), 2, cout), expect_conv, atol=1e-5)


@pytest.mark.skipif(not HAS_MINKOWSKI or not (ROOT / "models/backends/minkowski.py").exists(),
                    reason="needs MinkowskiEngine and the minkowski backend")
def test_minkowski_backend_matches_dense_with_converted_weights(reference_checkpoint, tmp_path):
    from models.masking import random_mask

    _, path = reference_checkpoint
    out = tmp_path / "ours.pth"
    assert main([str(path), str(out), "--to", "ours"]) == 0
    model = built(create_fcmae, "convnextv2_atto", backend="dense")
    model.load_state_dict(load(out)["model"], strict=True)
    imgs = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(5))  # small: MinkowskiEngine on CPU
    mask = random_mask(1, 2 * 3, 0.6, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        dense = model.encoder(imgs, mask)
        model.encoder.set_backend("minkowski")
        sparse = model.encoder(imgs, mask)
    assert torch.allclose(sparse, dense, atol=1e-4 * dense.abs().max().item())


# ------------------------------------------------------------------------------------------------
# The loader the fine-tune CLI uses


def test_to_timm_and_load_into_timm(sources, converted):
    name, sd = to_timm(sources["convnextv2_atto"]["finetune"])
    assert name == "convnextv2_atto"
    assert_same(sd, sources[name]["clf"].state_dict())
    _, ema = to_timm(sources[name]["finetune"], name, use_ema=True)
    assert_same(ema, sources[name]["ema"])
    for path in [converted(name, "finetune", "hf"), converted(name, "pretrain", "reference")]:
        got_name, got = to_timm(path, "convnextv2_atto")
        assert got_name == name and "stem.0.weight" in got and not any(k.startswith("decoder") for k in got)

    model = built(timm.create_model, name, num_classes=5)
    left = load_into_timm(model, sd)  # head re-initialised: 10 classes in the checkpoint, 5 here
    assert set(left) == HEAD_KEYS
    assert torch.equal(model.state_dict()["stages.2.blocks.3.mlp.grn.weight"], sd["stages.2.blocks.3.mlp.grn.weight"])
    with pytest.raises(ConversionError, match=r"shape mismatches \(2\): head\.fc\.weight \(10, 320\) vs model \(5, 320\)"):
        load_into_timm(model, sd, keep_head=True)
    model = built(timm.create_model, name, num_classes=NUM_CLASSES)
    assert load_into_timm(model, sd, keep_head=True) == []
    _, encoder_only = to_timm(sources[name]["pretrain"])
    with pytest.raises(ConversionError, match=r"missing keys \(4\): head\.norm\.weight"):
        load_into_timm(model, encoder_only, keep_head=True)
    broken = {k: v for k, v in sd.items() if k != "stages.1.downsample.1.bias"}
    with pytest.raises(ConversionError, match=r"missing keys \(1\): stages\.1\.downsample\.1\.bias"):
        load_into_timm(model, broken)
    with pytest.raises(ConversionError, match=r"unexpected keys \(1\): stages\.3\.blocks\.9\.norm\.weight"):
        load_into_timm(model, {**sd, "stages.3.blocks.9.norm.weight": torch.ones(320)})
    tiny = built(timm.create_model, "convnextv2_tiny", num_classes=NUM_CLASSES)
    with pytest.raises(ConversionError, match="holds convnextv2_atto .* but the model is convnextv2_tiny"):
        load_into_timm(tiny, sd)


# ------------------------------------------------------------------------------------------------
# Bad inputs: one line, naming the problem


class Exploit:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def make_bad(tmp_path, kind, sources):
    path = tmp_path / f"{kind}.pth"
    good = sources["convnextv2_atto"]["finetune"].read_bytes()
    if kind == "missing":
        return tmp_path / "does-not-exist.pth"
    if kind == "directory":
        (tmp_path / "hf").mkdir()  # a would-be Hugging Face directory without config.json
        (tmp_path / "hf" / "model.safetensors").write_bytes(b"")
        return tmp_path / "hf"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "truncated-safetensors":
        path = tmp_path / "t.safetensors"
        from safetensors.torch import save_file
        save_file({"w": torch.ones(1000)}, path)
        path.write_bytes(path.read_bytes()[:2000])
    elif kind == "random":
        path.write_bytes(bytes(random.Random(0).getrandbits(8) for _ in range(4096)))
    elif kind == "text":
        path.write_text("this is not a checkpoint\n")
    elif kind == "exploit-torch-save":
        torch.save({"model": Exploit(tmp_path / "PWNED")}, path)
    elif kind == "exploit-pickle":
        path.write_bytes(pickle.dumps({"model": Exploit(tmp_path / "PWNED")}, protocol=2))
    return path


BAD_FILES = {
    "missing": "no such file or directory",
    "directory": "has no config.json",
    "empty": r"empty file \(0 bytes\)",
    "truncated": "not a PyTorch checkpoint, or truncated .*central directory",
    "truncated-safetensors": "not a valid safetensors file, or truncated",
    "random": "not a PyTorch checkpoint",
    "text": "not a PyTorch checkpoint",
    "exploit-torch-save": r"refused to load: it would unpickle (posix|nt)\.system, which could run code",
    "exploit-pickle": r"refused to load: it would unpickle (posix|nt)\.system",
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_file_gives_one_line_error(tmp_path, sources, kind):
    path = make_bad(tmp_path, kind, sources)
    with pytest.raises(CheckpointError, match=BAD_FILES[kind]) as info:
        read_checkpoint(path)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "PWNED").exists()


def test_cli_error_is_one_line_exit_2_without_traceback(tmp_path, sources):
    path = make_bad(tmp_path, "exploit-torch-save", sources)
    proc = subprocess.run([sys.executable, "-m", "fcmae.tools.convert", str(path), str(tmp_path / "o.pth"), "--to", "timm"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert re.fullmatch(r"error: .*refused to load: .*\n", proc.stderr), proc.stderr
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "o.pth").exists()


def run_cli_error(argv, capsys):
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_wrong_variant_for_model(sources, tmp_path, capsys):
    err = run_cli_error([sources["convnextv2_tiny"]["finetune"], tmp_path / "o.pth", "--to", "timm",
                         "--model", "convnextv2_atto"], capsys)
    assert "holds convnextv2_tiny (depths (3, 3, 9, 3), dims (96, 192, 384, 768)), not convnextv2_atto" in err
    with pytest.raises(ConversionError, match="holds convnextv2_tiny .*not convnextv2_atto"):
        to_timm(sources["convnextv2_tiny"]["pretrain"], "convnextv2_atto")
    err = run_cli_error([sources["convnextv2_tiny"]["finetune"], tmp_path / "o.pth", "--to", "timm",
                         "--model", "convnextv2_tera"], capsys)
    assert "unknown model 'convnextv2_tera'" in err


def test_mixed_layouts_are_an_error(sources, tmp_path, capsys):
    sd = dict(sources["convnextv2_atto"]["clf"].state_dict())
    sd["downsample_layers.0.0.weight"] = sd.pop("stem.0.weight")
    torch.save(sd, tmp_path / "mixed.pth")
    err = run_cli_error([tmp_path / "mixed.pth", tmp_path / "o.pth", "--to", "hf"], capsys)
    assert re.search(r"mixed checkpoint layouts: \d+ timm keys \(e\.g\. stem\.0\.bias\) and 1 reference-dense keys "
                     r"\(e\.g\. downsample_layers\.0\.0\.weight\)", err), err
    # our pretraining encoder with a reference decoder block
    fcmae = dict(sources["convnextv2_atto"]["fcmae"].state_dict())
    fcmae["decoder.0.dwconv.weight"] = fcmae.pop("decoder.0.conv_dw.weight")
    with pytest.raises(ConversionError, match="mixed checkpoint layouts: .*ours-pretrain.*reference-minkowski"):
        convert(fcmae, "timm")


def test_missing_grn_tensors_are_an_error(sources, tmp_path, capsys):
    sd = {k: v for k, v in sources["convnextv2_atto"]["clf"].state_dict().items() if ".grn." not in k}
    torch.save({"model": sd}, tmp_path / "v1.pth")
    err = run_cli_error([tmp_path / "v1.pth", tmp_path / "o.safetensors", "--to", "timm"], capsys)
    assert "missing GRN tensors (24): stages.0.blocks.0.mlp.grn.weight, stages.0.blocks.0.mlp.grn.bias" in err
    # in the reference layout too, and a single missing gamma
    me = reference_minkowski_from_ours(sources["convnextv2_atto"]["fcmae"].state_dict())
    del me["encoder.stages.2.4.grn.gamma"]
    with pytest.raises(ConversionError, match=r"missing GRN tensors \(1\): encoder\.stages\.2\.4\.grn\.gamma"):
        convert(me, "ours")


def test_other_bad_contents(sources, tmp_path):
    sd = sources["convnextv2_atto"]["clf"].state_dict()
    with pytest.raises(ConversionError, match=r"unexpected keys \(1\): stages\.0\.blocks\.0\.extra"):
        to_timm({**sd, "stages.0.blocks.0.extra": torch.ones(1)})
    bad = {**sd, "stages.1.blocks.0.mlp.fc1.weight": sd["stages.1.blocks.0.mlp.fc1.weight"].reshape(80, 320, 1, 1)}
    with pytest.raises(ConversionError, match=r"shape mismatches \(1\): stages\.1\.blocks\.0\.mlp\.fc1\.weight "
                                              r"\(80, 320, 1, 1\) vs expected \(320, 80, 1, 1\)"):
        to_timm(bad)
    with pytest.raises(ConversionError, match="no state dict found: non-tensor entries epoch"):
        to_timm({"epoch": 3, "stem.0.weight": sd["stem.0.weight"]})
    with pytest.raises(ConversionError, match="no model_ema"):
        to_timm(sources["convnextv2_atto"]["pretrain"], use_ema=True)
    with pytest.raises(ConversionError, match=r"no ConvNeXt V2 weights found \(keys: fc\.weight"):
        to_timm({"fc.weight": torch.ones(2, 2)})
    with pytest.raises(ConversionError, match="format 'fcmae-pretrain' but its weights are in the timm layout"):
        to_timm({"format": PRETRAIN_FORMAT, "model": sd})


def test_hf_directory_problems(converted, tmp_path):
    src = converted("convnextv2_atto", "finetune", "hf")
    with pytest.raises(CheckpointError, match="has no config.json"):
        read_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text((src / "config.json").read_text().replace('"convnextv2"', '"convnext"'))
    with pytest.raises(CheckpointError, match="model_type is 'convnext', expected 'convnextv2'"):
        read_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text((src / "config.json").read_text().replace("320", "384"))
    (tmp_path / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    with pytest.raises(ConversionError, match=r"config\.json says depths .* but the weights are convnextv2_atto"):
        to_timm(tmp_path)


def test_unknown_target(sources, tmp_path, capsys):
    assert main([str(sources["convnextv2_atto"]["finetune"]), str(tmp_path / "o"), "--to", "onnx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: argument --to: 'onnx' is not one of ours, timm, hf, reference (see --help)"]
    with pytest.raises(ValueError, match="unknown target 'onnx'; valid targets: ours, timm, hf, reference"):
        convert(sources["convnextv2_atto"]["clf"].state_dict(), "onnx")


# ------------------------------------------------------------------------------------------------
# Any number of input channels: inferred from the stem, through every layout


CHANNELS = [1, 4]  # 3 is what every test above uses


@pytest.fixture(scope="module")
def channel_sources(tmp_path_factory):
    """Per C: an atto FCMAE pretraining checkpoint (pred has 32*32*C outputs) and a timm fine-tune checkpoint."""
    root = tmp_path_factory.mktemp("channels")
    out = {}
    for c in CHANNELS:
        fcmae = randomized(built(create_fcmae, "convnextv2_atto", backend="dense", in_chans=c), seed=30 + c)
        clf = randomized(built(timm.create_model, "convnextv2_atto", num_classes=NUM_CLASSES, in_chans=c), seed=40 + c)
        pre, fin = root / f"pretrain_{c}.pth", root / f"finetune_{c}.pth"
        torch.save({"format": PRETRAIN_FORMAT, "model_name": "convnextv2_atto", "model": fcmae.state_dict()}, pre)
        torch.save({"format": FINETUNE_FORMAT, "model_name": "convnextv2_atto", "model": clf.state_dict()}, fin)
        out[c] = {"fcmae": fcmae, "clf": clf, "pretrain": pre, "finetune": fin}
    return out


@pytest.mark.parametrize("c", CHANNELS)
@pytest.mark.parametrize("to", ["timm", "hf", "reference"])
def test_round_trips_keep_any_number_of_channels(channel_sources, tmp_path, c, to):
    src = channel_sources[c]
    for kind in ("pretrain", "finetune"):
        there, back = tmp_path / f"{kind}_{to}", tmp_path / f"{kind}_back.pth"
        assert main([str(src[kind]), str(there), "--to", to]) == 0
        assert main([str(there), str(back), "--to", "ours"]) == 0
        assert in_chans_of(there) == c and in_chans_of(back) == c
        model = load(back)["model"]
        if kind == "finetune":
            assert_same(model, src["clf"].state_dict())
        elif to == "reference":  # the decoder travels: pred (32*32*C, 512, 1, 1)
            assert model["pred.weight"].shape == (32 * 32 * c, 512, 1, 1)
            assert_same(model, src["fcmae"].state_dict())
            built(create_fcmae, "convnextv2_atto", in_chans=c).load_state_dict(model, strict=True)
        else:
            for key in ("head.norm.weight", "head.norm.bias"):  # hf adds a fresh final norm
                model.pop(key, None)
            assert_same(model, encoder_part(src["fcmae"].state_dict()))
    if to == "hf":
        assert json.loads((tmp_path / "finetune_hf" / "config.json").read_text())["num_channels"] == c


def test_in_chans_of_every_layout(sources, converted, channel_sources):
    assert in_chans_of(sources["convnextv2_atto"]["pretrain"]) == 3
    for to in ["timm", "hf", "reference"]:
        assert in_chans_of(converted("convnextv2_atto", "pretrain", to)) == 3
    assert in_chans_of(reference_minkowski_from_ours(channel_sources[4]["fcmae"].state_dict())) == 4
    assert in_chans_of(channel_sources[1]["clf"].state_dict()) == 1
    assert in_chans_of(to_timm(channel_sources[4]["pretrain"])[1]) == 4
    assert in_chans_of(channel_sources[4]["finetune"]) == 4
    with pytest.raises(ConversionError, match=r"no stem conv weight embeddings\.patch_embeddings\.weight"):
        in_chans_of({"embeddings.layernorm.weight": torch.ones(40)})


def test_logits_agree_timm_hf_with_four_channels(channel_sources, tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = channel_sources[4]["clf"]
    assert main([str(channel_sources[4]["finetune"]), str(tmp_path / "hf"), "--to", "hf"]) == 0
    hf = hf_load(transformers.ConvNextV2ForImageClassification, tmp_path / "hf")
    assert hf.config.num_channels == 4
    imgs = torch.randn(2, 4, 64, 96, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref, h = ours(imgs), hf(pixel_values=imgs).logits
    MAX_DIFF["atto C=4 logits hf-timm"] = (h - ref).abs().max().item()
    assert ref.abs().max() > 0.1 and torch.allclose(h, ref, atol=1e-5, rtol=0)


def test_hf_config_must_agree_with_the_stem(channel_sources, tmp_path):
    assert main([str(channel_sources[4]["finetune"]), str(tmp_path / "hf"), "--to", "hf"]) == 0
    config = tmp_path / "hf" / "config.json"
    config.write_text(config.read_text().replace('"num_channels": 4', '"num_channels": 3'))
    with pytest.raises(ConversionError, match="config.json says num_channels 3, but the stem weights take 4 input "
                                              "channels"):
        to_timm(tmp_path / "hf")


def test_load_into_timm_names_both_channel_counts(sources, channel_sources):
    _, rgb = to_timm(sources["convnextv2_atto"]["finetune"])
    grey_model = built(timm.create_model, "convnextv2_atto", num_classes=NUM_CLASSES, in_chans=1)
    with pytest.raises(ConversionError) as info:
        load_into_timm(grey_model, rgb)
    assert str(info.value) == ("the checkpoint takes 3 input channels but the model 1; adapt it with "
                               "`python -m fcmae.tools.convert IN OUT --to ours --in-chans 1`")
    with pytest.raises(ConversionError, match="takes 4 input channels but the model 1; only RGB checkpoints"):
        load_into_timm(grey_model, channel_sources[4]["clf"].state_dict())
    assert load_into_timm(grey_model, channel_sources[1]["clf"].state_dict(), keep_head=True) == []


# ------------------------------------------------------------------------------------------------
# Adapting RGB weights to C channels (--in-chans)


@pytest.mark.parametrize("c", [1, 4])
def test_adapt_rgb_checkpoint(sources, tmp_path, c):
    src = sources["convnextv2_atto"]
    for kind in ("pretrain", "finetune"):
        assert main([str(src[kind]), str(tmp_path / f"{kind}.pth"), "--to", "ours", "--in-chans", str(c)]) == 0
    pre, fin = load(tmp_path / "pretrain.pth")["model"], load(tmp_path / "finetune.pth")
    assert fin["format"] == FINETUNE_FORMAT and in_chans_of(fin) == c and in_chans_of(pre) == c
    model = built(timm.create_model, "convnextv2_atto", num_classes=NUM_CLASSES, in_chans=c)
    model.load_state_dict(fin["model"], strict=True)
    fcmae = built(create_fcmae, "convnextv2_atto", backend="dense", in_chans=c)
    fcmae.load_state_dict(pre, strict=True)

    rgb_sd, rgb_pre = src["clf"].state_dict(), src["fcmae"].state_dict()
    assert_same({k: v for k, v in fin["model"].items() if k != "stem.0.weight"},
                {k: v for k, v in rgb_sd.items() if k != "stem.0.weight"})  # only the stem changes
    w, pred, bias = rgb_sd["stem.0.weight"], rgb_pre["pred.weight"], rgb_pre["pred.bias"]
    if c == 1:  # timm's rule: the RGB filters summed; pred: the mean of the R, G, B rows of each pixel
        assert torch.allclose(fin["model"]["stem.0.weight"], w.sum(1, keepdim=True), atol=1e-7)
        assert torch.allclose(pre["pred.weight"], pred.reshape(1024, 3, 512, 1, 1).mean(1).reshape(1024, 512, 1, 1))
        assert torch.allclose(pre["pred.bias"], bias.reshape(1024, 3).mean(1))
    else:  # R, G, B, R scaled by 3/4; pred: channel c takes RGB channel c % 3's rows
        assert torch.equal(fin["model"]["stem.0.weight"], torch.cat([w, w[:, :1]], 1) * 0.75)
        assert torch.equal(pre["pred.weight"].reshape(1024, 4, 512), pred.reshape(1024, 3, 512)[:, [0, 1, 2, 0]])
        assert torch.equal(pre["pred.bias"].reshape(1024, 4), bias.reshape(1024, 3)[:, [0, 1, 2, 0]])
    if c != 1:
        return
    # a grey image x gives the RGB model's stem output (so its features and logits) on x replicated to RGB
    x = torch.randn(2, 1, 64, 96, generator=torch.Generator().manual_seed(8))
    rgb = x.expand(-1, 3, -1, -1)
    with torch.no_grad():
        stem, rgb_stem = model.stem(x), src["clf"].stem(rgb)
        logits, rgb_logits = model(x), src["clf"](rgb)
        mask = torch.tensor([[0, 1, 1, 0, 1, 1], [1, 1, 0, 1, 0, 1]])
        grey_pred, rgb_pred = fcmae.predict(x, mask), src["fcmae"].predict(rgb, mask)
    MAX_DIFF["atto grey stem vs RGB stem on replicated grey"] = (stem - rgb_stem).abs().max().item()
    assert torch.allclose(stem, rgb_stem, atol=1e-5 * rgb_stem.abs().max().item(), rtol=0)
    assert torch.allclose(logits, rgb_logits, atol=1e-4, rtol=0)
    # ... and the adapted decoder predicts the mean over R, G, B of the RGB model's prediction
    expected = rgb_pred.reshape(2, 1024, 3, 2, 3).mean(2)
    assert torch.allclose(grey_pred, expected, atol=1e-4 * expected.abs().max().item(), rtol=0)


def test_adapt_same_channels_is_a_no_op_and_other_sources_are_refused(sources, channel_sources, tmp_path, capsys):
    _, _, state = to_canonical(read_checkpoint(sources["convnextv2_atto"]["pretrain"]))
    assert adapt_in_chans(state, 3) is state
    four = to_canonical(read_checkpoint(channel_sources[4]["pretrain"]))[2]
    assert adapt_in_chans(four, 4) is four
    with pytest.raises(ConversionError, match=r"takes 4 input channels; only RGB \(3-channel\) checkpoints can be "
                                              "adapted to 1"):
        adapt_in_chans(four, 1)
    assert main([str(sources["convnextv2_atto"]["finetune"]), str(tmp_path / "same.pth"), "--to", "ours",
                 "--in-chans", "3"]) == 0
    assert_same(load(tmp_path / "same.pth")["model"], sources["convnextv2_atto"]["clf"].state_dict())
    err = run_cli_error([channel_sources[4]["finetune"], tmp_path / "o.pth", "--to", "timm", "--in-chans", "1"], capsys)
    assert "only RGB (3-channel) checkpoints can be adapted to 1" in err and not (tmp_path / "o.pth").exists()
    err = run_cli_error([sources["convnextv2_atto"]["finetune"], tmp_path / "o.pth", "--to", "timm", "--in-chans", "0"],
                        capsys)
    assert "--in-chans" in err and "'0' is not an integer >= 1" in err
    # other targets adapt too
    src = sources["convnextv2_atto"]["finetune"]
    assert main([str(src), str(tmp_path / "hf"), "--to", "hf", "--in-chans", "4"]) == 0
    assert in_chans_of(tmp_path / "hf") == 4
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_channels"] == 4


# ------------------------------------------------------------------------------------------------
# Existing outputs are replaced only with --overwrite, checked before the input is read


def test_existing_output_needs_overwrite(sources, converted, tmp_path, capsys):
    src = sources["convnextv2_atto"]["finetune"]
    out = tmp_path / "out.pth"
    out.write_bytes(b"old")
    # the input does not exist: the output is refused first
    err = run_cli_error([tmp_path / "missing.pth", out, "--to", "reference"], capsys)
    assert f"{out} already exists; pass --overwrite to replace it" in err and out.read_bytes() == b"old"
    assert main([str(src), str(out), "--to", "reference", "--overwrite"]) == 0
    assert detect_layout(read_checkpoint(out)) == "reference-dense"
    err = run_cli_error([src, tmp_path, "--to", "timm", "--overwrite"], capsys)
    assert f"{tmp_path} is a directory; --to timm writes a file" in err

    hf = tmp_path / "hf"
    hf.mkdir()  # an empty directory is fine
    assert main([str(src), str(hf), "--to", "hf"]) == 0
    err = run_cli_error([tmp_path / "missing.pth", hf, "--to", "hf"], capsys)
    assert "already exists and is not empty; pass --overwrite to replace its config.json and model.safetensors" in err
    (hf / "README.md").write_text("kept")
    assert main([str(converted("convnextv2_atto", "pretrain", "timm")), str(hf), "--to", "hf", "--overwrite"]) == 0
    assert json.loads((hf / "config.json").read_text())["architectures"] == ["ConvNextV2Model"]
    assert (hf / "README.md").read_text() == "kept"
    (hf / "pytorch_model.bin").write_bytes(b"stale")
    err = run_cli_error([src, hf, "--to", "hf", "--overwrite"], capsys)
    assert "holds other weight files (pytorch_model.bin) that would be mixed with the new ones" in err
    err = run_cli_error([src, out, "--to", "hf", "--overwrite"], capsys)
    assert f"{out} exists and is not a directory (--to hf writes a directory)" in err


def test_minkowski_kernel_mapping_lives_in_one_module():
    from models import me_layout
    from models.backends import minkowski

    assert minkowski.conv_kernel is me_layout.conv_kernel and minkowski.depthwise_kernel is me_layout.depthwise_kernel
    g = torch.Generator().manual_seed(9)
    w, dw = torch.randn(5, 6, 2, 2, generator=g), torch.randn(6, 1, 7, 7, generator=g)
    assert torch.equal(conv_weight(me_layout.conv_kernel(w), 2), w)
    assert torch.equal(depthwise_weight(me_layout.depthwise_kernel(dw), 7), dw)
    assert me_layout.conv_kernel(w)[1 + 2 * 0, 4, 3] == w[3, 4, 1, 0]  # K[h + k*w, i, o] = W[o, i, h, w]
    assert me_layout.depthwise_kernel(dw)[2 + 7 * 5, 4] == dw[4, 0, 2, 5]


def test_report_measured_differences():
    """Runs last: every logit/feature comparison above was measured for every model (atto: 1x1 conv MLP, tiny:
    Linear) and stays within float32 round-off of the outputs' scale; the figures are printed (pytest -s)."""
    pytest.importorskip("transformers")
    for name in MODELS:
        for what in ("logits timm-ours", "logits hf-ours", "features timm-ours", "features hf-ours"):
            assert any(k.startswith(f"{name} {what}") for k in MAX_DIFF), f"{name} {what} not measured"
    for key, value in MAX_DIFF.items():
        print(f"max |diff| {key}: {value:.3e}")
        assert value < 1e-3, (key, value)