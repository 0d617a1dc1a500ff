"""Checkpoint conversion: ours (pretrain / fine-tune), timm, Hugging Face and the reference code's layouts.

Every input is read into one canonical state dict: timm's names and shapes for the encoder (`stem.*`,
`stages.*`), `head.norm.*` / `head.fc.*` when the source has a head, and our FCMAE decoder names
(`proj.*`, `mask_token`, `decoder.{d}.*`, `pred.*`) when it has a decoder; that is `FCMAE.state_dict()`
without its `encoder.` prefix, plus timm's head. Each other layout is a table of
`(canonical key, layout key, kind)` rows built from the variant's depths; the kind says how a tensor is
reshaped or permuted, and reading a layout walks the same table backwards, so round trips are bit-exact.

Any number of input channels C travels through every layout: the stem conv is (dims[0], C, 4, 4) and the
decoder's `pred` (32*32*C, decoder_dim, 1, 1), outputs ordered (p, q, channel); C is read from the stem
(`in_chans_of`), and `adapt_in_chans` turns an RGB checkpoint into a C-channel one (see there).

Loading is strict: every key of the table must be present with exactly the expected shape and nothing
may be left over; problems raise `ConversionError` with a one-line message naming the keys
(the reference loader only printed them, and users lost runs to silently unloaded GRN weights).
Pure functions of state dicts and containers: reading and writing files is the callers' job (the CLIs read
with fcmae.runtime.checkpoint_file, which never unpickles code, and turn a ConversionError into their one-line
error through fcmae.runtime.weights).
"""
import functools
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import timm
import torch
from timm.models import adapt_input_conv

from .fcmae import create_fcmae
from .me_layout import conv_kernel, conv_weight, depthwise_kernel, depthwise_weight
from .variants import Variant, get_variant, variant_from_dims


class ConversionError(ValueError):
    """Weights that do not fit a layout or a model: the message is one line naming the keys or shapes."""


PRETRAIN_FORMAT = "fcmae-pretrain"  # {"format", "model_name", "model": FCMAE.state_dict(), ...}
FINETUNE_FORMAT = "fcmae-finetune"  # {"format", "model_name", "model": timm state dict, "model_ema"?: ..., ...}
LAYOUTS = ("ours-pretrain", "ours-finetune", "timm", "reference-minkowski", "reference-dense", "hf")
TARGETS = ("ours", "timm", "hf", "reference")


# --------------------------------------------------------------------------------------------------
# Containers


def state_dict_of(obj, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The state dict inside a container (`model`, `model_ema` with use_ema, `state_dict`), or obj itself."""
    if not isinstance(obj, dict):
        raise ConversionError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    if use_ema:
        if not isinstance(obj.get("model_ema"), dict):
            raise ConversionError("checkpoint has no model_ema weights (drop --ema / use_ema)")
        sd = obj["model_ema"]
    elif isinstance(obj.get("model"), dict):
        sd = obj["model"]
    elif isinstance(obj.get("state_dict"), dict):
        sd = obj["state_dict"]
    else:
        sd = obj
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"no state dict found: non-tensor entries {_short(bad)} (top-level keys: {_short(list(obj))})")
    if not sd:
        raise ConversionError("checkpoint holds an empty state dict")
    return sd


# --------------------------------------------------------------------------------------------------
# Layout detection

# Which layout a key belongs to (matched at the start of the key). Decoder keys shared by ours and the
# reference (proj, mask_token, pred, decoder.d.norm) belong to no single layout.
_KEY_PATTERNS = {
    "timm": re.compile(r"(stem\.|stages\.\d+\.(downsample|blocks)\.|head\.(norm|fc)\.)"),
    "ours-pretrain": re.compile(r"(encoder\.(stem\.|stages\.\d+\.(downsample|blocks)\.)|decoder\.\d+\.(conv_dw|mlp)\.)"),
    "reference-dense": re.compile(r"(downsample_layers\.|stages\.\d+\.\d+\.|norm\.|head\.(weight|bias)$)"),
    "reference-minkowski": re.compile(
        r"(encoder\.(downsample_layers\.|stages\.\d+\.\d+\.)|decoder\.\d+\.(dwconv|pwconv\d|grn)\.)"),
    "hf": re.compile(r"((convnextv2\.)?(embeddings\.|encoder\.stages\.\d+\.(downsampling_layer|layers)\.|layernorm\.)"
                     r"|classifier\.)"),
}
_DECODER_KEY = re.compile(r"(proj\.|mask_token$|pred\.|decoder\.\d+\.)")


def _layout_of_keys(sd) -> str:
    found: Dict[str, List[str]] = {}
    for key in sd:
        for layout, pattern in _KEY_PATTERNS.items():
            if pattern.match(key):
                found.setdefault(layout, []).append(key)
                break
    if len(found) > 1:
        parts = [f"{len(keys)} {layout} keys (e.g. {keys[0]})" for layout, keys in found.items()]
        raise ConversionError(f"mixed checkpoint layouts: {' and '.join(parts)}")
    if not found:
        raise ConversionError(f"no ConvNeXt V2 weights found (keys: {_short(list(sd))})")
    return next(iter(found))


def detect_layout(obj, use_ema: bool = False) -> str:
    """One of LAYOUTS for a container or a state dict; raises ConversionError for mixed or unknown keys."""
    fmt = obj.get("format") if isinstance(obj, dict) and isinstance(obj.get("format"), str) else None
    layout = _layout_of_keys(state_dict_of(obj, use_ema))
    expected = {PRETRAIN_FORMAT: "ours-pretrain", FINETUNE_FORMAT: "timm", None: layout}
    if fmt not in expected:
        raise ConversionError(f"unknown checkpoint format {fmt!r} (expected {PRETRAIN_FORMAT} or {FINETUNE_FORMAT})")
    if layout != expected[fmt]:
        raise ConversionError(f"checkpoint says format {fmt!r} but its weights are in the {layout} layout")
    return "ours-finetune" if fmt == FINETUNE_FORMAT else layout


# --------------------------------------------------------------------------------------------------
# Tensor kinds: how a canonical (timm) tensor is stored in another layout


@dataclass(frozen=True)
class Kind:
    shape: Callable  # canonical shape -> layout shape
    to_layout: Callable  # canonical tensor -> layout tensor
    from_layout: Callable  # (layout tensor, canonical shape) -> canonical tensor


def _reshape_kind(shape: Callable) -> Kind:
    return Kind(shape, lambda t: t.reshape(shape(t.shape)), lambda t, s: t.reshape(s))


SAME = _reshape_kind(lambda s: tuple(s))
LINEAR = _reshape_kind(lambda s: tuple(s[:2]))  # timm fc (out, in, 1, 1) for atto..nano, (out, in) above
GRN = _reshape_kind(lambda s: (1, 1, 1, s[0]))  # timm (C,) <-> reference / Hugging Face (1, 1, 1, C)
ROW = _reshape_kind(lambda s: (1, s[0]))  # (C,) <-> MinkowskiEngine bias / GRN (1, C)
# MinkowskiEngine kernels (models/me_layout.py): conv (k*k, in, out), depthwise (k*k, C)
ME_CONV = Kind(lambda s: (s[2] * s[3], s[1], s[0]), conv_kernel, lambda t, s: conv_weight(t, s[-1]))
ME_DWCONV = Kind(lambda s: (s[2] * s[3], s[0]), depthwise_kernel, lambda t, s: depthwise_weight(t, s[-1]))

Row = Tuple[str, str, Kind]  # (canonical key, layout key, kind)


def _param(canonical: str, layout: str, weight: Kind = SAME, bias: Kind = SAME) -> List[Row]:
    return [(f"{canonical}.weight", f"{layout}.weight", weight), (f"{canonical}.bias", f"{layout}.bias", bias)]


# --------------------------------------------------------------------------------------------------
# Layout tables for the given stage depths. `head` holds the head groups present ("norm", "fc");
# decoder_depth 0 means no decoder.


def _timm_rows(depths, head) -> List[Row]:
    rows = _param("stem.0", "stem.0") + _param("stem.1", "stem.1")
    for i, depth in enumerate(depths):
        if i > 0:
            rows += _param(f"stages.{i}.downsample.0", f"stages.{i}.downsample.0")
            rows += _param(f"stages.{i}.downsample.1", f"stages.{i}.downsample.1")
        for j in range(depth):
            b = f"stages.{i}.blocks.{j}."
            for name in ["conv_dw", "norm", "mlp.fc1", "mlp.grn", "mlp.fc2"]:
                rows += _param(b + name, b + name)
    return rows + [r for g in ["norm", "fc"] if g in head for r in _param(f"head.{g}", f"head.{g}")]


def _decoder_rows(depth: int, reference: bool) -> List[Row]:
    """Our decoder blocks are timm ConvNeXtBlocks with Linear MLPs; the reference's are its dense Block
    (models/convnextv2.py: dwconv, norm, pwconv1, grn.gamma/beta (1, 1, 1, C), pwconv2)."""
    if depth == 0:
        return []
    rows = _param("proj", "proj") + [("mask_token", "mask_token", SAME)]
    for d in range(depth):
        b = f"decoder.{d}."
        if reference:
            rows += _param(b + "conv_dw", b + "dwconv") + _param(b + "norm", b + "norm")
            rows += _param(b + "mlp.fc1", b + "pwconv1")
            rows += [(b + "mlp.grn.weight", b + "grn.gamma", GRN), (b + "mlp.grn.bias", b + "grn.beta", GRN)]
            rows += _param(b + "mlp.fc2", b + "pwconv2")
        else:
            for name in ["conv_dw", "norm", "mlp.fc1", "mlp.grn", "mlp.fc2"]:
                rows += _param(b + name, b + name)
    return rows + _param("pred", "pred")


def _ours_pretrain_rows(depths, decoder_depth: int) -> List[Row]:
    enc = [(c, "encoder." + k, kind) for c, k, kind in _timm_rows(depths, head=())]
    return enc + _decoder_rows(decoder_depth, reference=False)


def _reference_dense_rows(depths, head) -> List[Row]:
    """The released dense layout (models/convnextv2.py of the reference): downsample_layers.0 is the stem."""
    rows = _param("stem.0", "downsample_layers.0.0") + _param("stem.1", "downsample_layers.0.1")
    for i, depth in enumerate(depths):
        if i > 0:
            rows += _param(f"stages.{i}.downsample.0", f"downsample_layers.{i}.0")
            rows += _param(f"stages.{i}.downsample.1", f"downsample_layers.{i}.1")
        for j in range(depth):
            b, r = f"stages.{i}.blocks.{j}.", f"stages.{i}.{j}."
            rows += _param(b + "conv_dw", r + "dwconv") + _param(b + "norm", r + "norm")
            rows += _param(b + "mlp.fc1", r + "pwconv1", weight=LINEAR)
            rows += [(b + "mlp.grn.weight", r + "grn.gamma", GRN), (b + "mlp.grn.bias", r + "grn.beta", GRN)]
            rows += _param(b + "mlp.fc2", r + "pwconv2", weight=LINEAR)
    if "norm" in head:
        rows += _param("head.norm", "norm")
    if "fc" in head:
        rows += _param("head.fc", "head")
    return rows


def _reference_minkowski_rows(depths, decoder_depth: int) -> List[Row]:
    """The reference FCMAE pretraining checkpoint (models/fcmae.py + models/convnextv2_sparse.py of
    facebookresearch/ConvNeXt-V2, read back by utils.remap_checkpoint_keys): the encoder is
    SparseConvNeXtV2 under `encoder.`: a dense stem (nn.Conv2d + channels_first LayerNorm),
    downsample_layers.i = (MinkowskiLayerNorm `.ln`, MinkowskiConvolution `.kernel` (4, in, out) + bias (1, out));
    blocks: MinkowskiDepthwiseConvolution (`dwconv.kernel` (49, C), `dwconv.bias` (1, C): the authors'
    MinkowskiEngine fork), MinkowskiLayerNorm `norm.ln`, MinkowskiLinear `pwconv1.linear` / `pwconv2.linear`,
    MinkowskiGRN `grn.gamma` / `grn.beta` (1, 4C)."""
    e = "encoder."
    rows = _param("stem.0", e + "downsample_layers.0.0") + _param("stem.1", e + "downsample_layers.0.1")
    for i, depth in enumerate(depths):
        if i > 0:
            rows += _param(f"stages.{i}.downsample.0", e + f"downsample_layers.{i}.0.ln")
            rows += [(f"stages.{i}.downsample.1.weight", e + f"downsample_layers.{i}.1.kernel", ME_CONV),
                     (f"stages.{i}.downsample.1.bias", e + f"downsample_layers.{i}.1.bias", ROW)]
        for j in range(depth):
            b, r = f"stages.{i}.blocks.{j}.", e + f"stages.{i}.{j}."
            rows += [(b + "conv_dw.weight", r + "dwconv.kernel", ME_DWCONV), (b + "conv_dw.bias", r + "dwconv.bias", ROW)]
            rows += _param(b + "norm", r + "norm.ln")
            rows += _param(b + "mlp.fc1", r + "pwconv1.linear", weight=LINEAR)
            rows += [(b + "mlp.grn.weight", r + "grn.gamma", ROW), (b + "mlp.grn.bias", r + "grn.beta", ROW)]
            rows += _param(b + "mlp.fc2", r + "pwconv2.linear", weight=LINEAR)
    return rows + _decoder_rows(decoder_depth, reference=True)


def _hf_rows(depths, head) -> List[Row]:
    """transformers ConvNextV2 (modeling_convnextv2.py), as ConvNextV2Model names it; stage 0 has no
    downsampling layer. ConvNextV2ForImageClassification adds the `convnextv2.` prefix and `classifier`."""
    rows = _param("stem.0", "embeddings.patch_embeddings") + _param("stem.1", "embeddings.layernorm")
    for i, depth in enumerate(depths):
        s = f"encoder.stages.{i}."
        if i > 0:
            rows += _param(f"stages.{i}.downsample.0", s + "downsampling_layer.0")
            rows += _param(f"stages.{i}.downsample.1", s + "downsampling_layer.1")
        for j in range(depth):
            b, r = f"stages.{i}.blocks.{j}.", f"{s}layers.{j}."
            rows += _param(b + "conv_dw", r + "dwconv") + _param(b + "norm", r + "layernorm")
            rows += _param(b + "mlp.fc1", r + "pwconv1", weight=LINEAR)
            rows += _param(b + "mlp.grn", r + "grn", weight=GRN, bias=GRN)
            rows += _param(b + "mlp.fc2", r + "pwconv2", weight=LINEAR)
    if "norm" in head:
        rows += _param("head.norm", "layernorm")
    if "fc" in head:
        rows += _param("head.fc", "classifier")
    return rows


def _rows(layout: str, depths, head=(), decoder_depth: int = 0) -> List[Row]:
    """The table of a layout; ours-pretrain and reference-minkowski hold no head, the others no decoder."""
    if layout == "ours-pretrain":
        return _ours_pretrain_rows(depths, decoder_depth)
    if layout == "reference-minkowski":
        return _reference_minkowski_rows(depths, decoder_depth)
    builders = {"timm": _timm_rows, "ours-finetune": _timm_rows, "reference-dense": _reference_dense_rows, "hf": _hf_rows}
    return builders[layout](depths, head)


# Per layout: block keys (stage, block) for counting depths; layout keys of the head groups.
_BLOCK_KEY = {
    "timm": r"stages\.(\d+)\.blocks\.(\d+)\.", "ours-pretrain": r"encoder\.stages\.(\d+)\.blocks\.(\d+)\.",
    "reference-dense": r"stages\.(\d+)\.(\d+)\.", "reference-minkowski": r"encoder\.stages\.(\d+)\.(\d+)\.",
    "hf": r"encoder\.stages\.(\d+)\.layers\.(\d+)\.",
}
_HEAD_KEY = {
    "timm": {"norm": r"head\.norm\.", "fc": r"head\.fc\."},
    "reference-dense": {"norm": r"norm\.", "fc": r"head\."},
    "hf": {"norm": r"layernorm\.", "fc": r"classifier\."},
}


# --------------------------------------------------------------------------------------------------
# Reading any layout into the canonical state dict


@functools.lru_cache(maxsize=None)
def _expected_shapes(model_name: str, decoder_dim: int, decoder_depth: int,
                     in_chans: int) -> Dict[str, Tuple[int, ...]]:
    """Canonical key -> shape, from timm / our FCMAE built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        timm_model = timm.create_model(model_name, num_classes=0, in_chans=in_chans)
        shapes = {k: tuple(t.shape) for k, t in timm_model.state_dict().items()}
        if decoder_depth:
            fcmae = create_fcmae(model_name, decoder_dim=decoder_dim, decoder_depth=decoder_depth, in_chans=in_chans)
            shapes.update({k: tuple(t.shape) for k, t in fcmae.state_dict().items() if not k.startswith("encoder.")})
    return shapes


def _stem_key(layout: str) -> str:
    """The layout's key of the stem conv weight (dims[0], C, 4, 4), the one tensor that says C."""
    return next(key for canonical, key, _ in _rows(layout, (0, 0, 0, 0)) if canonical == "stem.0.weight")


def _stem_channels(sd, layout: str) -> Optional[int]:
    w = sd.get(_stem_key(layout))
    return w.shape[1] if isinstance(w, torch.Tensor) and w.dim() == 4 and w.shape[1] > 0 else None


def in_chans_of(obj, use_ema: bool = False) -> int:
    """The number of input channels C a checkpoint holds (its stem conv is (dims[0], C, 4, 4)): a container, a
    state dict in any layout, or a canonical / timm state dict (from to_timm / to_canonical)."""
    sd = state_dict_of(obj, use_ema)
    if isinstance(sd.get("stem.0.weight"), torch.Tensor):  # canonical (which may hold a decoder) or timm
        layout = "timm"
    else:
        layout = detect_layout(obj, use_ema)
        layout = "timm" if layout == "ours-finetune" else layout
        sd = _strip_hf_prefix(sd) if layout == "hf" else sd
    found = _stem_channels(sd, layout)
    if found is None:
        raise ConversionError(f"{layout} checkpoint has no stem conv weight {_stem_key(layout)} shaped (C0, C, 4, 4)")
    return found


def _infer_variant(sd, layout: str) -> Optional[Variant]:
    """The variant from the block count per stage and each stage's width (its first block norm weight)."""
    blocks: Dict[int, set] = {}
    for key in sd:
        m = re.match(_BLOCK_KEY[layout], key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if sorted(blocks) != [0, 1, 2, 3]:
        return None
    depths = [max(blocks[i]) + 1 for i in range(4)]
    rows = {c: k for c, k, _ in _rows(layout, depths)}
    norms = [sd.get(rows[f"stages.{i}.blocks.0.norm.weight"]) for i in range(4)]
    if any(t is None for t in norms):
        return None
    try:
        return variant_from_dims(depths, [t.numel() for t in norms])
    except ValueError:
        return None


def _describe(v: Variant) -> str:
    return f"{v.name} (depths {v.depths}, dims {v.dims})"


def to_canonical(obj, model_name: Optional[str] = None, use_ema: bool = False) -> Tuple[str, str, Dict[str, torch.Tensor]]:
    """Any supported container / state dict -> (model_name, layout, canonical state dict).

    model_name, when given, must match the variant the checkpoint holds (it is needed only when the
    variant cannot be inferred from the shapes)."""
    layout = detect_layout(obj, use_ema)
    sd = state_dict_of(obj, use_ema)
    if layout == "hf":
        sd = _strip_hf_prefix(sd)
    keys = "timm" if layout == "ours-finetune" else layout
    variant = _resolve_variant(sd, keys, model_name)
    in_chans = _stem_channels(sd, keys) or 3  # without a usable stem weight, _read_rows names the problem
    _check_hf_config(obj.get("hf_config"), variant, in_chans)

    head = [g for g, pattern in _HEAD_KEY.get(keys, {}).items() if any(re.match(pattern, k) for k in sd)]
    decoder_depth, decoder_dim = _decoder_size(sd) if keys in ("ours-pretrain", "reference-minkowski") else (0, 0)
    rows = _rows(keys, variant.depths, head, decoder_depth)
    shapes = dict(_expected_shapes(variant.name, decoder_dim, decoder_depth, in_chans))
    if "fc" in head:  # any number of classes
        fc = sd.get(next(k for c, k, _ in rows if c == "head.fc.weight"))
        shapes["head.fc.weight"] = (fc.shape[0] if fc is not None and fc.dim() else 0, variant.dims[-1])
        shapes["head.fc.bias"] = shapes["head.fc.weight"][:1]
    out = _read_rows(sd, rows, shapes, f"{layout} checkpoint of {variant.name}")
    if "head.fc.weight" in out and "head.norm.weight" not in out:
        raise ConversionError("checkpoint has a classifier but no final norm (head.norm)")
    return variant.name, layout, out


def _resolve_variant(sd, layout: str, model_name: Optional[str]) -> Variant:
    wanted = None
    if model_name is not None:
        try:
            wanted = get_variant(model_name)
        except ValueError as e:
            raise ConversionError(str(e)) from None
    found = _infer_variant(sd, layout)
    if wanted and found and wanted != found:
        raise ConversionError(f"checkpoint holds {_describe(found)}, not {wanted.name}")
    if not (wanted or found):
        raise ConversionError(f"cannot infer the ConvNeXt V2 variant of this {layout} checkpoint from its shapes; "
                              "pass --model (model_name)")
    return wanted or found


def _check_hf_config(config: Optional[dict], variant: Variant, in_chans: int):
    if not config:
        return
    if (list(config.get("depths", [])) != list(variant.depths)
            or list(config.get("hidden_sizes", [])) != list(variant.dims)):
        raise ConversionError(f"config.json says depths {config.get('depths')}, hidden_sizes "
                              f"{config.get('hidden_sizes')}, but the weights are {_describe(variant)}")
    if config.get("num_channels", 3) != in_chans:  # transformers' default is 3
        raise ConversionError(f"config.json says num_channels {config.get('num_channels', 3)}, but the stem weights "
                              f"take {in_chans} input channels")


def _decoder_size(sd) -> Tuple[int, int]:
    """(depth, dim) of the decoder in a pretraining state dict; (0, 0) when it has none."""
    if not any(_DECODER_KEY.match(k) for k in sd):
        return 0, 0
    blocks = {int(m.group(1)) for k in sd for m in [re.match(r"decoder\.(\d+)\.", k)] if m}
    token = sd.get("mask_token")
    return (max(blocks) + 1 if blocks else 1), (token.shape[1] if token is not None and token.dim() == 4 else 512)


def _read_rows(sd, rows: List[Row], shapes, what: str) -> Dict[str, torch.Tensor]:
    """Walk a table backwards: every layout key present with exactly its expected shape, nothing left over."""
    out, missing, mismatched = {}, [], []
    for canonical, key, kind in rows:
        if key not in sd:
            missing.append(key)
            continue
        want = tuple(kind.shape(shapes[canonical]))
        if tuple(sd[key].shape) != want:
            mismatched.append(f"{key} {tuple(sd[key].shape)} vs expected {want}")
            continue
        out[canonical] = kind.from_layout(sd[key], shapes[canonical])
    used = {key for _, key, _ in rows}
    _raise_problems(what, missing, [k for k in sd if k not in used], mismatched)
    return out


def _strip_hf_prefix(sd):
    p = "convnextv2."
    if not any(k.startswith(p) for k in sd):
        return sd
    bare = [k for k in sd if not k.startswith(p) and not k.startswith("classifier.")]
    if bare:
        raise ConversionError(f"mixed Hugging Face keys with and without the {p} prefix (e.g. {bare[0]})")
    return {k[len(p):] if k.startswith(p) else k: v for k, v in sd.items()}


def _raise_problems(what: str, missing, unexpected, mismatched):
    grn = [k for k in missing if ".grn" in k]
    parts = []
    if grn:
        parts.append(f"missing GRN tensors ({len(grn)}): {_short(grn)}; a ConvNeXt V1 checkpoint?")
    other = [k for k in missing if ".grn" not in k]
    for label, keys in [("missing keys", other), ("unexpected keys", unexpected), ("shape mismatches", mismatched)]:
        if keys:
            parts.append(f"{label} ({len(keys)}): {_short(keys)}")
    if parts:
        raise ConversionError(f"{what} does not fit: " + "; ".join(parts))


def _short(keys, limit: int = 6) -> str:
    keys = list(keys)
    more = f", ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(str(k) for k in keys[:limit]) + more


# --------------------------------------------------------------------------------------------------
# Writing the canonical state dict in a layout


def _is_head(key: str) -> bool:
    return key.startswith("head.")


def has_decoder(state) -> bool:
    return "mask_token" in state


def _timm_part(state) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not _DECODER_KEY.match(k)}


def _write(state, layout: str, model_name: str) -> Dict[str, torch.Tensor]:
    """Walk a table forwards."""
    head = [g for g in ("norm", "fc") if f"head.{g}.weight" in state]
    decoder_depth = len({k.split(".")[1] for k in state if k.startswith("decoder.")})
    return {key: kind.to_layout(state[canonical]).contiguous()
            for canonical, key, kind in _rows(layout, get_variant(model_name).depths, head, decoder_depth)}


def hf_config(model_name: str, num_labels: int, in_chans: int = 3) -> dict:
    """config.json for transformers' ConvNextV2 (final LayerNorm eps 1e-6 as in the reference)."""
    v = get_variant(model_name)
    arch = "ConvNextV2ForImageClassification" if num_labels else "ConvNextV2Model"
    return {"architectures": [arch], "model_type": "convnextv2", "depths": list(v.depths),
            "hidden_sizes": list(v.dims), "num_channels": in_chans, "patch_size": 4, "num_stages": 4,
            "hidden_act": "gelu", "layer_norm_eps": 1e-6, "drop_path_rate": 0.0, "image_size": 224,
            "initializer_range": 0.02, "num_labels": num_labels}


def from_canonical(model_name: str, state, to: str):
    """Canonical state dict -> the `to` layout: a state dict, or (config, state dict) for "hf".

    ours: FCMAE.state_dict() layout when there is a decoder, else timm's (fine-tune) layout;
    timm: encoder + head, decoder dropped; reference: the MinkowskiEngine pretraining layout when there
    is a decoder, else the released dense layout (with norm/head if present); hf: decoder dropped."""
    if to not in TARGETS:
        raise ValueError(f"unknown target {to!r}; valid targets: {', '.join(TARGETS)}")
    if to == "ours":
        return _write(state, "ours-pretrain", model_name) if has_decoder(state) else _timm_part(state)
    if to == "timm":
        return _timm_part(state)
    if to == "reference":
        if has_decoder(state):
            return _write(state, "reference-minkowski", model_name)
        return _write(state, "reference-dense", model_name)
    state = _timm_part(state)
    if "head.norm.weight" not in state:
        # ConvNextV2Model always has its final LayerNorm; an encoder-only checkpoint gets it at its initial
        # value (weight 1, bias 0), what a freshly built model holds, so loading reports nothing missing.
        c4 = get_variant(model_name).dims[-1]
        dtype = state["stem.0.weight"].dtype
        state = {**state, "head.norm.weight": torch.ones(c4, dtype=dtype), "head.norm.bias": torch.zeros(c4, dtype=dtype)}
    num_labels = state["head.fc.weight"].shape[0] if "head.fc.weight" in state else 0
    sd = _write(state, "hf", model_name)
    if num_labels:  # ConvNextV2ForImageClassification holds the ConvNextV2Model as `convnextv2`
        sd = {k if k.startswith("classifier.") else "convnextv2." + k: v for k, v in sd.items()}
    return hf_config(model_name, num_labels, in_chans_of(state)), sd


def convert(obj, to: str, model_name: Optional[str] = None, use_ema: bool = False, in_chans: Optional[int] = None):
    """Any supported input (container or state dict) -> the `to` layout (see from_canonical);
    with in_chans, an RGB checkpoint is adapted to that many input channels first (adapt_in_chans)."""
    if to not in TARGETS:
        raise ValueError(f"unknown target {to!r}; valid targets: {', '.join(TARGETS)}")
    name, _, state = to_canonical(obj, model_name, use_ema)
    if in_chans is not None:
        state = adapt_in_chans(state, in_chans)
    return from_canonical(name, state, to)


# --------------------------------------------------------------------------------------------------
# Other numbers of input channels


def adapt_in_chans(state, in_chans: int) -> Dict[str, torch.Tensor]:
    """A canonical (or timm) state dict of an RGB checkpoint -> the same weights for `in_chans` input channels.

    Stem conv: timm's rule for pretrained weights (timm.models.adapt_input_conv, what
    `timm.create_model(..., pretrained=True, in_chans=C)` does): C = 1 sums the RGB filters, so a grey image
    x gives the stem output the RGB model gives on x replicated to RGB; C > 1 repeats R, G, B, R, ... and
    scales by 3 / C. Decoder `pred` (outputs ordered (p, q, channel)): output channel c takes the rows of RGB
    channel c % 3; for C = 1 the mean of the three RGB rows, so on a grey image the adapted FCMAE predicts
    the mean over R, G, B of what the RGB model predicts on the image replicated to RGB (up to rounding).
    Everything else is unchanged. Same C as the checkpoint: returned as is (a no-op);
    a checkpoint that is not RGB (C != 3) cannot be adapted: ConversionError."""
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    have = in_chans_of(state)
    if have == in_chans:
        return state
    if have != 3:
        raise ConversionError(f"the checkpoint takes {have} input channels; only RGB (3-channel) checkpoints can be "
                              f"adapted to {in_chans}")
    out = dict(state)
    out["stem.0.weight"] = adapt_input_conv(in_chans, state["stem.0.weight"]).contiguous()
    for key in ("pred.weight", "pred.bias"):
        if key in state:
            out[key] = _adapt_pred(state[key], in_chans)
    return out


def _adapt_pred(t: torch.Tensor, in_chans: int) -> torch.Tensor:
    """(32*32*3, ...) rows ordered (p, q, channel) -> (32*32*in_chans, ...), see adapt_in_chans."""
    rgb = t.reshape(-1, 3, *t.shape[1:])
    if in_chans == 1:
        adapted = rgb.float().mean(dim=1, keepdim=True).to(t.dtype)
    else:
        adapted = rgb[:, [c % 3 for c in range(in_chans)]]
    return adapted.reshape(-1, *t.shape[1:]).contiguous()


# --------------------------------------------------------------------------------------------------
# What the fine-tune and kNN CLIs use


def to_timm(obj, model_name: Optional[str] = None, use_ema: bool = False) -> Tuple[str, Dict[str, torch.Tensor]]:
    """The single loader for fine-tuning / evaluation: any supported input (a container as read from a
    checkpoint file or Hugging Face directory, or a state dict) -> (model_name, timm state dict): encoder, plus
    head.* when the source has a head; a decoder is dropped. Raises ConversionError when model_name is given and
    the checkpoint holds another variant. Build the model with `in_chans=in_chans_of(state_dict)`."""
    name, _, state = to_canonical(obj, model_name, use_ema)
    return name, _timm_part(state)


def load_into_timm(model: torch.nn.Module, timm_state_dict, keep_head: bool = False) -> List[str]:
    """Strictly load a timm state dict into a timm ConvNeXt V2: every non-head key must be present with the
    exact shape and nothing else may be there; head.* is loaded only with keep_head (and must then match).
    Returns the keys left at their initial values (the head unless keep_head)."""
    own = model.state_dict()
    mine, theirs = _infer_variant(own, "timm"), _infer_variant(timm_state_dict, "timm")
    if mine and theirs and mine != theirs:
        raise ConversionError(f"checkpoint holds {_describe(theirs)}, but the model is {mine.name}")
    stem = timm_state_dict.get("stem.0.weight")
    if stem is not None and stem.dim() == 4 and stem.shape[1] != own["stem.0.weight"].shape[1]:
        have, want = stem.shape[1], own["stem.0.weight"].shape[1]
        fix = (f"adapt it with `python -m fcmae.tools.convert IN OUT --to ours --in-chans {want}`" if have == 3
               else "only RGB checkpoints can be adapted")
        raise ConversionError(f"the checkpoint takes {have} input channels but the model {want}; {fix}")
    wanted = [k for k in own if keep_head or not _is_head(k)]
    given = {k: v for k, v in timm_state_dict.items() if keep_head or not _is_head(k)}
    missing = [k for k in wanted if k not in given]
    unexpected = [k for k in given if k not in own]
    mismatched = [f"{k} {tuple(given[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in wanted if k in given and given[k].shape != own[k].shape]
    if keep_head and any(_is_head(k) for k in missing + mismatched):
        hint = "; fine-tune with the head re-initialised (keep_head=False) to change it"
    else:
        hint = ""
    try:
        _raise_problems("checkpoint", missing, unexpected, mismatched)
    except ConversionError as e:
        raise ConversionError(f"{e}{hint}") from None
    result = model.load_state_dict(given, strict=False)
    left = [k for k in own if k not in given]
    assert sorted(result.missing_keys) == sorted(left) and not result.unexpected_keys, result
    return left
