"""Command-line and YAML options, each declared once with its type and valid range.

`add(group, "--lr", Float(min=0, open_min=True), ...)`: the kind (Int, Float, Str, Bool, Device) converts a
command-line string and checks a value from any source against its range. Values set by `-c FILE.yaml` skip
argparse's conversion, so after parsing every option's final value is checked again by its kind (`check_all`):
`model: 123`, `batch_size: 1.5`, `mask_ratio: [0.5]`, `epochs: null`, `overwrite: 'false'` or `--lr nan` all end
as one `error:` line naming the option and its valid range, exit code 2, before anything is written. A config
file is read defensively (`read_config`): a recipe name or a path; no folders, FIFOs, binary or non-UTF-8 files,
duplicate, non-string or nested `config` keys; values are shown bounded (`shown`), so an anchor bomb is refused
in milliseconds.

Each option has a dash name; the reference code's underscore spelling is an alias that parses but is not listed
by --help. The option groups both training CLIs share (optimisation, run, data loading) are declared here once.
This module imports neither torch nor timm: `--help` answers before they load (`answer_help`).
"""
import argparse
import math
import os
import re
import reprlib
import sys
from typing import Any, Callable, Optional, Sequence

import yaml

from .errors import UsageError

INT64_MAX = 2 ** 63 - 1  # integers end in torch and C code: a larger one overflows there, not here
MAX_STRING = 4096  # PATH_MAX: no option value (a path, a name, a policy) is longer


def shown(value) -> str:
    """A value for an error message, bounded: at most SHOWN_CHARS characters whatever its size (a YAML anchor bomb
    expands to billions of elements, an integer can have thousands of digits); reprlib stops early, so it is fast."""
    try:
        text = _SHOWN.repr(value)
    except ValueError:  # repr(int) refuses more than sys.get_int_max_str_digits() digits
        return f"an integer of {value.bit_length()} bits"
    return clipped(text)


def clipped(text: str) -> str:
    """A message part (not a value) bounded as `shown` bounds values."""
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


SHOWN_CHARS = 200
_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxtuple, _SHOWN.maxdict = 2, 6, 6, 6
_SHOWN.maxstring, _SHOWN.maxlong, _SHOWN.maxother = 80, 40, 80


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

    def unset(self):
        """The value of an option left unset (None where None is its default)."""
        return None


def _bound(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


class _Number(Kind):
    def __init__(self, min=None, max=None, open_min=False, open_max=False, optional=False):
        super().__init__(optional)
        self.min, self.max, self.open_min, self.open_max = min, max, open_min, open_max

    def describe(self) -> str:
        lo = "" if self.min is None else f"{'>' if self.open_min else '>='} {_bound(self.min)}"
        hi = "" if self.max is None else f"{'<' if self.open_max else '<='} {_bound(self.max)}"
        bounds = " and ".join(b for b in (lo, hi) if b)
        return f"{'a finite ' if self.py_type is float else 'an '}{self.name}" + (f" {bounds}" if bounds else "")

    def parse(self, text: str):
        try:
            return self.py_type(text)
        except ValueError:
            raise ValueError(self.describe()) from None

    def check(self, value):
        # a string is read as the command line reads it: YAML takes `1e-3` (no dot) for a string, not a number
        return super().check(self.parse(value) if isinstance(value, str) else value)

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

    def valid(self, value):
        if abs(value) > INT64_MAX:
            raise ValueError(f"{self.describe()} of at most 64 bits")
        return super().valid(value)


class Float(_Number):
    name, py_type = "number", float

    def accepts(self, value) -> bool:  # YAML writes 1 for 1.0
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    def valid(self, value):
        try:
            value = float(value)
        except OverflowError:  # an integer beyond float's range
            raise ValueError(self.describe()) from None
        return super().valid(value)


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
        if len(value) > MAX_STRING:
            raise ValueError(f"a string of at most {MAX_STRING} characters")
        return value


class Bool(Kind):
    """true or false; a flag's YAML value must be a YAML boolean ('false' in quotes is a string, and true)."""

    name, py_type = "boolean", bool

    def describe(self) -> str:
        return "true or false"

    def accepts(self, value) -> bool:
        return isinstance(value, bool)


class Unavailable(ValueError):
    """A well-formed value this machine cannot serve (e.g. --device cuda without a GPU): the message is a whole
    sentence, not a range."""


class Device(Str):
    """cpu, cuda or cuda:N (present on this machine); unset (None): cuda where there is a GPU, else cpu. torch is
    imported only when a value is checked, after parsing (--help does not wait for it)."""

    def describe(self) -> str:
        return "cpu, cuda or cuda:N"

    def unset(self):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def valid(self, value):
        import torch

        kind, _, index = value.partition(":")
        if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
            raise ValueError(self.describe())
        if kind == "cuda" and not torch.cuda.is_available():
            raise Unavailable("CUDA is not available on this machine; use --device cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise Unavailable(f"this machine has {torch.cuda.device_count()} GPU(s): use a GPU index below "
                              f"{torch.cuda.device_count()}")
        return value


DEVICE_HELP = "cpu, cuda or cuda:N (default: cuda where there is a GPU, else cpu)"


def add(target, *names, kind: Optional[Kind] = None, **kwargs):
    """An option of `kind`; `--some-name` also answers to `--some_name` (not listed by --help). Boolean options
    (`kind=Bool()`) get `--name/--no-name` unless given an explicit store_true action; a store_true flag is a
    Bool too, so a YAML value for it is checked like any other. A Str with choices shows them as its metavar."""
    names = list(names)
    for name in list(names):
        if name.startswith("--") and "-" in name[2:]:
            names.append("--" + name[2:].replace("-", "_"))
    if kind is None and kwargs.get("action") in ("store_true", "store_false"):
        kind = Bool()
    if isinstance(kind, Bool) and "action" not in kwargs:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif kind is not None and "action" not in kwargs:
        kwargs["type"] = _argparse_type(kind)
    if "metavar" not in kwargs and kwargs.get("action") is None:
        if isinstance(kind, Str) and kind.choices:
            kwargs["metavar"] = "{" + ",".join(kind.choices) + "}"
        elif isinstance(kind, _Number):
            kwargs["metavar"] = "N" if isinstance(kind, Int) else "X"
    if kind is not None and not kwargs.get("help"):  # argparse lists an option without help bare: say its range
        kwargs["help"] = kind.describe()
    action = target.add_argument(*names, **kwargs)
    action.kind = kind
    # None counts as "unset" only where the option itself defaults to None: a stage's set_defaults or a -c file
    # can replace the parser default, and `epochs: null` in a YAML file must still be refused
    action.declared_default = action.default
    return action


def _argparse_type(kind: Kind):
    def convert(text):
        try:
            return kind.convert(text)
        except Unavailable as e:
            raise argparse.ArgumentTypeError(f"{shown(text)}: {e}") from None
        except ValueError as e:  # argparse words it "argument --x: invalid <name> value: 'y'"; ours says the range
            raise argparse.ArgumentTypeError(f"{shown(text)} is not {e}") from None

    convert.__name__ = kind.name
    return convert


# argparse takes "-1e-6", "-inf" or "-nan" after an option for another option ("expected one argument"); these
# are values, to be refused (or accepted) by the option's kind with its range
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


def package_version() -> str:
    """The installed distribution's version, else the one this checkout declares (fcmae.__version__)."""
    from importlib import metadata

    try:
        return metadata.version("fcmae")
    except metadata.PackageNotFoundError:
        import fcmae

        return fcmae.__version__


class _Version(argparse.Action):
    """--version: the version is looked up only when asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog} {package_version()}")
        parser.exit()


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help as users read it: a one-line usage (positionals, required options, then [options]), each option
    once under its dash spellings (the underscore aliases still parse), its default and choices shown, and the
    description and examples as written."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=34, width=_terminal_width())

    def _format_usage(self, usage, actions, groups, prefix):
        if usage is None:
            parts = [self._prog]
            for a in actions:
                if not a.option_strings:
                    parts.append(self._format_args(a, self._get_default_metavar_for_positional(a)))
                elif a.required:
                    parts.append(f"{a.option_strings[0]} {self._format_args(a, a.dest.upper())}")
            usage = " ".join(parts + ["[options]"])
        return f"{'usage: ' if prefix is None else prefix}{usage}\n\n"

    def _get_default_metavar_for_positional(self, action):
        return action.dest.upper()

    def _format_action_invocation(self, action):
        if not action.option_strings:
            return super()._format_action_invocation(action)
        listed = argparse.Action(option_strings=[s for s in action.option_strings if "_" not in s.lstrip("-")],
                                 dest=action.dest, nargs=action.nargs, metavar=action.metavar)
        return super()._format_action_invocation(listed)

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or "default" in text or not action.option_strings or default is None
                or default is False or default is argparse.SUPPRESS or isinstance(action, _Version)):
            return text
        if isinstance(default, (list, tuple)):
            default = " ".join(map(str, default))
        return f"{text} (default: {str(default).replace('%', '%%')})".lstrip()


def _terminal_width() -> int:
    import shutil

    return min(110, shutil.get_terminal_size((100, 24)).columns)


class ArgParser(argparse.ArgumentParser):
    """One `error:` line instead of a usage dump, --help as users read it (HelpFormatter), --version, and
    negative numbers taken as values. `recipes`: the stage whose named recipes `-c NAME` finds (find_config)."""

    def __init__(self, *args, recipes: Optional[str] = None, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER
        self.recipes = recipes
        self.add_argument("--version", action=_Version, help="print the version and exit")

    def error(self, message):
        raise UsageError(f"{message} (see --help)")  # one line, no usage dump

    def defaults(self) -> dict:
        """Each option's value when it is not given (the stage's set_defaults included)."""
        return {a.dest: self.get_default(a.dest) for a in self._actions if a.dest not in ("help", "version")}


def answer_help(build_parser: Callable[[], argparse.ArgumentParser], argv=None):
    """--help / --version answered from the light options module, before a stage imports torch and timm
    (seconds): a stage's `python -m` entry calls this first. With `-c RECIPE` the help shows the recipe's
    defaults; a config that cannot be read, and anything else, return for the real parse (which reports it)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    asked = argv[:argv.index("--")] if "--" in argv else argv
    if not any(a in ("-h", "--help", "--version") for a in asked):
        return
    parser = build_parser()
    if "--version" in asked and not {"-h", "--help"} & set(asked):
        parser.parse_args(["--version"])  # prints and exits
    config = _config_argument(asked)
    if config:
        try:
            parser.set_defaults(**read_config(parser, config))
        except UsageError:
            return
    parser.print_help()
    parser.exit()


def _config_argument(argv) -> Optional[str]:
    """The -c/--config value of argv (parse_with_config reads it before the other options)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config", default=None)
    return pre.parse_known_args(argv)[0].config


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
            setattr(args, action.dest, kind.unset())  # unset, where unset is the default (e.g. --lr: use --blr)
            continue
        try:
            if action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 0):
                count = action.nargs if isinstance(action.nargs, int) else None
                if not isinstance(value, (list, tuple)) or not value or (count and len(value) != count):
                    raise ValueError(f"a list of {count or 'one or more'} values, each {kind.describe()}")
                value = [kind.check(v) for v in value]
            else:
                value = kind.check(value)
        except Unavailable as e:
            raise UsageError(f"{option_name(action)} {shown(value)}: {e}") from None
        except ValueError as e:
            raise UsageError(f"{option_name(action)} must be {e}, got {shown(value)}") from None
        setattr(args, action.dest, value)


def typed_options(parser: argparse.ArgumentParser, argv=None) -> frozenset:
    """The dests given on the command line itself (not defaults, not a -c config): what the user typed is
    refused when it cannot apply, a default or recipe value is replaced by what can (e.g. RandAugment for
    4 channels). Found by parsing argv again with every default suppressed, so abbreviations and `--x=v` count."""
    saved = [(a, a.default) for a in parser._actions]
    saved_defaults = dict(parser._defaults)
    try:
        for a in parser._actions:
            a.default = argparse.SUPPRESS
        parser._defaults.clear()
        given = parser.parse_known_args(argv, argparse.Namespace())[0]
    finally:
        for a, default in saved:
            a.default = default
        parser._defaults.update(saved_defaults)
    return frozenset(vars(given))


def parse_with_config(parser: ArgParser, argv=None) -> argparse.Namespace:
    """Parser defaults < `-c RECIPE_OR_FILE.yaml` < command line, then every value checked (`check_all`).
    `args.typed`: the options given on the command line (`typed_options`); not an option, never saved (`plain`)."""
    config = _config_argument(argv)
    if config:
        parser.set_defaults(**read_config(parser, config))
    args = parser.parse_args(argv)
    check_all(parser, args)
    args.typed = typed_options(parser, argv)
    return args


# --------------------------------------------------------------------------------------------------
# -c: a recipe by name or a YAML file, read defensively

MAX_CONFIG_BYTES = 1 << 18  # a config is a page of options (the recipes are under 2 KiB); more is not one
# libyaml's parser where PyYAML was built with it: 3x faster, and it limits the nesting depth itself
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def recipe_dirs(stage: str) -> list:
    """Where `-c NAME` looks for NAME.yaml: the checkout's configs/<stage>/ (the `configs` folder next to the
    fcmae package) and the installed package data fcmae/configs/<stage>/."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../fcmae
    return [os.path.join(os.path.dirname(package), "configs", stage), os.path.join(package, "configs", stage)]


def recipe_names(stage: str) -> list:
    names = set()
    for folder in recipe_dirs(stage):
        if os.path.isdir(folder):
            names.update(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml"))
    return sorted(names)


def find_config(name: str, stage: Optional[str]) -> str:
    """The file `-c NAME` means: an existing path as given, else (for a stage) its recipe NAME or NAME.yaml;
    UsageError listing the recipes when there is neither."""
    if os.path.exists(name) or not stage:
        return name
    recipe = name[:-5] if name.endswith(".yaml") else name
    if os.sep not in recipe:
        for folder in recipe_dirs(stage):
            path = os.path.join(folder, recipe + ".yaml")
            if os.path.isfile(path):
                return path
    raise UsageError(f"config {shown(name)}: no such file, and no {stage} recipe of that name; recipes: "
                     f"{', '.join(recipe_names(stage)) or 'none found'}")


def config_text(path: str) -> str:
    """The file's text: a regular file (a FIFO would wait for a writer forever), at most MAX_CONFIG_BYTES, not
    binary, UTF-8."""
    try:
        info = os.stat(path)
        if os.path.isdir(path):
            raise UsageError(f"config {path} is a folder, not a YAML file")
        if not os.path.isfile(path):
            raise UsageError(f"config {path} is not a regular file")
        if info.st_size > MAX_CONFIG_BYTES:
            raise UsageError(f"config {path} is {info.st_size} bytes: an options file is a few hundred")
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise UsageError(f"cannot read config {path}: {e.strerror}") from None
    if b"\0" in data:
        raise UsageError(f"config {path} is binary, not YAML text")
    try:
        return data.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as e:
        raise UsageError(f"config {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                         "save it as UTF-8") from None


def load_config(path: str, text: str) -> dict:
    """The YAML mapping of `text`: its keys plain option names, each once (yaml.safe_load would keep the last of
    two silently)."""
    loader = YAML_LOADER(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise UsageError(f"config {path} is empty: write option: value lines")
        if not isinstance(node, yaml.MappingNode):
            raise UsageError(f"config {path} must be a mapping of option: value")
        seen = set()
        for key, _ in node.value:
            if not (isinstance(key, yaml.ScalarNode) and key.tag == "tag:yaml.org,2002:str"):
                raise UsageError(f"config {path}: key {shown(getattr(key, 'value', key))} is not an option name")
            dest = key.value.replace("-", "_")
            if dest in seen:
                raise UsageError(f"config {path} sets {shown(dest)} twice (line {key.start_mark.line + 1})")
            seen.add(dest)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise UsageError(f"config {path} is not valid YAML: {clipped(' '.join(str(e).split()))}") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        if isinstance(e, UsageError):
            raise
        raise UsageError(f"config {path} is not valid YAML: {clipped(str(e))}") from None
    except RecursionError:
        raise UsageError(f"config {path} is nested too deeply to be options") from None
    finally:
        loader.dispose()


def read_config(parser: argparse.ArgumentParser, name: str) -> dict:
    """`-c NAME`'s option values by dest: only options (no `config`, `help` or positional keys); their values are
    checked after parsing with the command line's (check_all)."""
    path = find_config(name, getattr(parser, "recipes", None))
    values = {k.replace("-", "_"): v for k, v in load_config(path, config_text(path)).items()}
    if values.get("config") is not None:  # `config: null` (config.yaml of older runs) names nothing
        raise UsageError(f"config {path} has a config: key; a config cannot name another one (delete that line: "
                         "the values it would bring belong in this file)")
    values.pop("config", None)
    options = {a.dest for a in parser._actions if getattr(a, "kind", None) is not None}
    unknown = sorted(set(values) - options)
    if unknown:
        listed = ", ".join(shown(k)[1:-1] for k in unknown[:10])
        raise UsageError(f"config {path} has unknown keys: {listed}"
                         + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""))
    return values


def input_size(values) -> tuple:
    """`--input-size 224` (square) or `--input-size 192 256` (height width)."""
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise UsageError(f"--input-size takes one (square) or two (height width) numbers, got {shown(values)}")
    return tuple(values)


def plain(args: argparse.Namespace) -> dict:
    """The options as plain YAML/JSON values (tuples as lists), as written to config.yaml and checkpoints (without
    `config` and `typed`, which say how they were given, not what they are: a run's config.yaml holds the values
    its -c recipe gave, and is itself a valid -c file)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items() if k not in ("config", "typed")}


# --------------------------------------------------------------------------------------------------
# Option groups shared by the pretraining and fine-tuning CLIs (stage-specific defaults via set_defaults)

POSITIVE = dict(min=1)


def add_config_option(p: ArgParser):
    """-c: a recipe of the parser's stage by name, or a YAML file (find_config)."""
    names = recipe_names(p.recipes) if p.recipes else []
    add(p, "-c", "--config", default=None, metavar="RECIPE",
        help="option defaults from a YAML file or a recipe by name"
             + (f" (configs/{p.recipes}/NAME.yaml): {', '.join(names)}" if names else "")
             + "; the command line wins over it")


def add_model_input_options(g):
    add(g, "--input-size", kind=Int(min=32), nargs="+", default=[224],
        help="224 (square) or 'H W' in pixels (pretraining: multiples of 32)")
    add(g, "--in-chans", kind=Int(min=1, max=64), default=3,
        help="input channels: 3 for RGB, 1 for grey (CT, X-ray), 4-13 for multispectral tiles")


def add_optimisation_options(g):
    add(g, "-b", "--batch-size", kind=Int(**POSITIVE), default=64, help="images per process per micro-batch")
    add(g, "--accum-iter", "--grad-accum-steps", kind=Int(**POSITIVE), default=1, help="micro-batches per optimiser step")
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
    add(g, "-j", "--num-workers", "--workers", kind=Int(min=0), default=2,
        help="DataLoader worker processes per training process")
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
    add(g, "--output-dir", "--output", kind=Str(), default=output_dir, help="checkpoints, logs and pictures")
    add(g, "--resume", kind=Str(), default="auto",
        help="'auto' (newest loadable checkpoint in --output-dir), a checkpoint path, or 'none'")
    add(g, "--overwrite", action="store_true",
        help="start anew in an --output-dir that holds another run's checkpoints (they are deleted)")
    add(g, "--save-every-steps", kind=Int(optional=True, **POSITIVE), default=None,
        help="also checkpoint every N steps (mid-epoch)")
    add(g, "--keep-checkpoints", kind=Int(**POSITIVE), default=2, help="how many step checkpoints to keep")
    add(g, "--log-every", kind=Int(**POSITIVE), default=20, help="progress line every N steps")
    add(g, "--device", kind=Device(), default=None, help=DEVICE_HELP)
    add(g, "--seed", kind=Int(min=0), default=0)
