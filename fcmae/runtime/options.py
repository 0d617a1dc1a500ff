"""Command-line and YAML options, each declared once with its type and valid range.

`add(group, "--lr", Float(min=0, open_min=True), ...)`: the kind (Int, Float, Str, Bool, Path) converts a
command-line string and checks a value from any source against its range. Values set by `-c FILE.yaml` skip
argparse's conversion, so after parsing every option's final value is checked again by its kind (`check_all`):
`model: 123`, `batch_size: 1.5`, `mask_ratio: [0.5]`, `epochs: null` or `--lr nan` all end as one `error:` line
naming the option and its valid range, exit code 2, before anything is written.

Each option has a dash name; the reference code's underscore spelling is an alias. The option groups both
training CLIs share (optimisation, run, data loading) are declared here once.
"""
import argparse
import math
import re
from typing import Any, Optional, Sequence

import torch
import yaml

from .errors import UsageError


class Kind:
    """A value type with a range: `convert` parses a command-line string, `check` validates any value."""

    name = "value"
    py_type: Any = object

    def __init__(self, optional: bool = False):
        self.optional = optional  # None is a valid value (e.g. --lr unset: use --blr)

    def describe(self) -> str:
        return self.name

    def convert(self, text: str):
        return self.check(self.parse(text))

    def parse(self, text: str):
        return text

    def check(self, value):
        if value is None and self.optional:
            return None
        if not self.accepts(value):
            raise ValueError(self.describe())
        return self.valid(value)

    def accepts(self, value) -> bool:
        return isinstance(value, self.py_type) and not isinstance(value, bool)

    def valid(self, value):
        return value


class _Number(Kind):
    def __init__(self, min=None, max=None, open_min=False, open_max=False, optional=False):
        super().__init__(optional)
        self.min, self.max, self.open_min, self.open_max = min, max, open_min, open_max

    def describe(self) -> str:
        lo = "" if self.min is None else f"{'>' if self.open_min else '>='} {self.min:g}"
        hi = "" if self.max is None else f"{'<' if self.open_max else '<='} {self.max:g}"
        bounds = " and ".join(b for b in (lo, hi) if b)
        return f"{'a finite ' if self.py_type is float else 'an '}{self.name}" + (f" {bounds}" if bounds else "")

    def parse(self, text: str):
        try:
            return self.py_type(text)
        except ValueError:
            raise ValueError(self.describe()) from None

    def valid(self, value):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(self.describe())
        if self.min is not None and (value < self.min or (self.open_min and value == self.min)):
            raise ValueError(self.describe())
        if self.max is not None and (value > self.max or (self.open_max and value == self.max)):
            raise ValueError(self.describe())
        return value


class Int(_Number):
    name, py_type = "integer", int


class Float(_Number):
    name, py_type = "number", float

    def accepts(self, value) -> bool:  # YAML writes 1 for 1.0
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    def valid(self, value):
        return super().valid(float(value))


class Str(Kind):
    name, py_type = "string", str

    def __init__(self, choices: Optional[Sequence[str]] = None, optional=False, nonempty=True):
        super().__init__(optional)
        self.choices, self.nonempty = choices, nonempty

    def describe(self) -> str:
        return f"one of {', '.join(self.choices)}" if self.choices else "a non-empty string"

    def valid(self, value):
        if (self.choices and value not in self.choices) or (self.nonempty and not value):
            raise ValueError(self.describe())
        return value


class Bool(Kind):
    name, py_type = "boolean", bool

    def describe(self) -> str:
        return "true or false"

    def accepts(self, value) -> bool:
        return isinstance(value, bool)


class Unavailable(ValueError):
    """A well-formed value this machine cannot serve (e.g. --device cuda without a GPU): the message is a whole
    sentence, not a range."""


class Device(Str):
    """cpu, cuda or cuda:N (present on this machine)."""

    def describe(self) -> str:
        return "cpu, cuda or cuda:N"

    def valid(self, value):
        kind, _, index = value.partition(":")
        if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
            raise ValueError(self.describe())
        if kind == "cuda" and not torch.cuda.is_available():
            raise Unavailable("CUDA is not available on this machine; use --device cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise Unavailable(f"this machine has {torch.cuda.device_count()} GPU(s): use a GPU index below "
                              f"{torch.cuda.device_count()}")
        return value


def add(target, *names, kind: Optional[Kind] = None, **kwargs):
    """An option of `kind`; `--some-name` also answers to `--some_name`. Boolean options (`kind=Bool()`) get
    `--name/--no-name` unless given an explicit store_true action."""
    names = list(names)
    for name in list(names):
        if name.startswith("--") and "-" in name[2:]:
            names.append("--" + name[2:].replace("-", "_"))
    if isinstance(kind, Bool) and "action" not in kwargs:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif kind is not None and "action" not in kwargs:
        kwargs["type"] = _argparse_type(kind)
    action = target.add_argument(*names, **kwargs)
    action.kind = kind
    # None counts as "unset" only where the option itself defaults to None: a stage's set_defaults or a -c file
    # can replace the parser default, and `epochs: null` in a YAML file must still be refused
    action.declared_default = kwargs.get("default")
    return action


def _argparse_type(kind: Kind):
    def convert(text):
        try:
            return kind.convert(text)
        except Unavailable as e:
            raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
        except ValueError as e:  # argparse words it "argument --x: invalid <name> value: 'y'"; ours says the range
            raise argparse.ArgumentTypeError(f"{text!r} is not {e}") from None

    convert.__name__ = kind.name
    return convert


# argparse takes "-1e-6", "-inf" or "-nan" after an option for another option ("expected one argument"); these
# are values, to be refused (or accepted) by the option's kind with its range
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


class ArgParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER

    def error(self, message):
        raise UsageError(f"{message} (see --help)")  # one line, no usage dump


def option_name(action) -> str:
    return next((s for s in action.option_strings if s.startswith("--")), action.dest)


def check_all(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """Every option's final value (command line, YAML or default) against its kind; lists element by element."""
    for action in parser._actions:
        kind = getattr(action, "kind", None)
        if kind is None or not hasattr(args, action.dest):
            continue
        value = getattr(args, action.dest)
        if value is None and getattr(action, "declared_default", action.default) is None:
            continue  # unset, where unset is the default (e.g. --lr: use --blr)
        try:
            if action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 0):
                count = action.nargs if isinstance(action.nargs, int) else None
                if not isinstance(value, (list, tuple)) or not value or (count and len(value) != count):
                    raise ValueError(f"a list of {count or 'one or more'} values, each {kind.describe()}")
                value = [kind.check(v) for v in value]
            else:
                value = kind.check(value)
        except Unavailable as e:
            raise UsageError(f"{option_name(action)} {value}: {e}") from None
        except ValueError as e:
            shown = value if not isinstance(value, str) else repr(value)
            raise UsageError(f"{option_name(action)} must be {e}, got {shown}") from None
        setattr(args, action.dest, value)


def parse_with_config(parser: ArgParser, argv=None) -> argparse.Namespace:
    """Parser defaults < `-c FILE.yaml` < command line, then every value checked (`check_all`)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**read_config(parser, known.config))
    args = parser.parse_args(argv)
    check_all(parser, args)
    return args


def read_config(parser: argparse.ArgumentParser, path: str) -> dict:
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except OSError as e:
        raise UsageError(f"cannot read config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"config {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(values, dict):
        raise UsageError(f"config {path} must be a mapping of option: value")
    dests = {a.dest for a in parser._actions}
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - dests)
    if unknown:
        raise UsageError(f"config {path} has unknown keys: {', '.join(unknown)}")
    return values


def input_size(values) -> tuple:
    """`--input-size 224` (square) or `--input-size 192 256` (height width)."""
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise UsageError(f"--input-size takes one (square) or two (height width) numbers, got {values}")
    return tuple(values)


def plain(args: argparse.Namespace) -> dict:
    """The options as plain YAML/JSON values (tuples as lists), as written to config.yaml and checkpoints."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()}


# --------------------------------------------------------------------------------------------------
# Option groups shared by the pretraining and fine-tuning CLIs (stage-specific defaults via set_defaults)

POSITIVE = dict(min=1)


def add_model_input_options(g):
    add(g, "--input-size", kind=Int(min=32), nargs="+", default=[224],
        help="224 (square) or 'H W' in pixels (pretraining: multiples of 32)")
    add(g, "--in-chans", kind=Int(min=1, max=64), default=3,
        help="input channels: 3 for RGB, 1 for grey (CT, X-ray), 4-13 for multispectral tiles")


def add_optimisation_options(g):
    add(g, "--batch-size", kind=Int(**POSITIVE), default=64, help="images per process per micro-batch")
    add(g, "--accum-iter", kind=Int(**POSITIVE), default=1, help="micro-batches per optimiser step")
    add(g, "--epochs", kind=Int(**POSITIVE), default=1)
    add(g, "--max-steps", kind=Int(optional=True, **POSITIVE), default=None,
        help="stop after this many optimiser steps (smoke runs)")
    add(g, "--warmup-epochs", kind=Float(min=0), default=0, help="linear warm-up from lr 0, then per-step cosine")
    add(g, "--blr", kind=Float(min=0, open_min=True), default=1.5e-4,
        help="base lr: lr = blr x effective batch / 256")
    add(g, "--lr", kind=Float(min=0, open_min=True, optional=True), default=None,
        help="absolute lr (overrides --blr)")
    add(g, "--min-lr", kind=Float(min=0), default=0.0, help="the cosine schedule's final lr")
    add(g, "--weight-decay", kind=Float(min=0), default=0.05)
    add(g, "--clip-grad", kind=Float(min=0, open_min=True, optional=True), default=None,
        help="clip the gradient norm to this value (default: no clipping)")
    add(g, "--amp", kind=Str(["none", "bf16", "fp16"]), default="none",
        help="autocast precision: bf16 (recommended on GPUs and recent CPUs) or fp16 (with a gradient scaler); "
             "the loss, its target and GRN's norms stay float32")
    add(g, "--grad-checkpointing", action="store_true",
        help="recompute each encoder block in backward instead of storing its activations (less memory, slower)")
    add(g, "--channels-last", action="store_true", help="channels-last memory format for images and conv weights")
    add(g, "--compile", action="store_true", help="torch.compile the model (the first steps are slow while it compiles)")
    add(g, "--skip-nonfinite", kind=Int(min=0), default=0, metavar="K",
        help="skip up to K steps whose loss or gradient is not finite (default 0: the first one stops the run, "
             "exit code 3, leaving the last checkpoint untouched)")


def add_data_loading_options(g):
    add(g, "--num-workers", kind=Int(min=0), default=2, help="DataLoader worker processes per training process")
    add(g, "--bad-image", kind=Str(["skip", "error"]), default="skip",
        help="an unreadable image file: 'skip' it (replaced by the next file that loads, logged once) or 'error' "
             "(stop at the first)")
    add(g, "--max-bad-fraction", kind=Float(min=0, max=1), default=0.01, metavar="F",
        help="stop once more than this fraction of a folder's images turned out unreadable (0 to 1, default 0.01)")
    add(g, "--mean", kind=Float(), nargs="+", default=None,
        help="per-channel mean used to normalise inputs (C values; default: ImageNet's for 3 channels; see "
             "python -m fcmae.tools.data_stats)")
    add(g, "--std", kind=Float(min=0, open_min=True), nargs="+", default=None,
        help="per-channel standard deviation (C values, > 0)")


# options of add_run_options / add_data_loading_options (and a few more) that say how or how far to run, not what
# is computed: free to change between a run and its resume (fcmae.runtime.run_start.StartRules)
RUN_ONLY = frozenset({"config", "resume", "overwrite", "output_dir", "max_steps", "num_workers", "log_every",
                      "save_every_steps", "keep_checkpoints", "device", "bad_image", "max_bad_fraction", "epochs",
                      "compile"})


def add_run_options(g, output_dir: str):
    add(g, "--output-dir", kind=Str(), default=output_dir)
    add(g, "--resume", kind=Str(), default="auto",
        help="'auto' (newest loadable checkpoint in --output-dir), a checkpoint path, or 'none'")
    add(g, "--overwrite", action="store_true",
        help="start anew in an --output-dir that holds another run's checkpoints (they are deleted)")
    add(g, "--save-every-steps", kind=Int(optional=True, **POSITIVE), default=None,
        help="also checkpoint every N steps (mid-epoch)")
    add(g, "--keep-checkpoints", kind=Int(**POSITIVE), default=2, help="how many step checkpoints to keep")
    add(g, "--log-every", kind=Int(**POSITIVE), default=20, help="progress line every N steps")
    add(g, "--device", kind=Device(), default="cuda" if torch.cuda.is_available() else "cpu")
    add(g, "--seed", kind=Int(min=0), default=0)
