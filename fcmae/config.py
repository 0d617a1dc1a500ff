"""Command-line and YAML configuration shared by the CLIs.

Each option is declared once with a dash name; the reference code's underscore spelling is accepted as an
alias. `-c/--config FILE.yaml` supplies defaults (keys in either spelling) that explicit flags override;
an unknown key in the file is an error. The resolved configuration is written next to the run.
"""
import argparse

import yaml

from .errors import UsageError


def add(target, *names, **kwargs):
    """Add an option to a parser or group; `--some-name` also answers to its `--some_name` spelling."""
    names = list(names)
    for name in list(names):
        if name.startswith("--") and "-" in name[2:]:
            names.append("--" + name[2:].replace("-", "_"))
    return target.add_argument(*names, **kwargs)


def add_speed_options(g):
    """Memory/speed switches shared with the fine-tune CLI."""
    add(g, "--grad-checkpointing", action="store_true",
        help="recompute each encoder block in backward instead of storing its activations (less memory, ~30%% slower)")
    add(g, "--channels-last", action="store_true", help="channels-last memory format for images and conv weights")
    add(g, "--compile", action="store_true", help="torch.compile the model (pretraining: the decoder only, unless --backend dense; the first steps are "
             "slow while it compiles)")


def add_bad_image_options(g):
    """What unreadable files in a --data-path folder do (fcmae/images.py); shared with the fine-tune CLI."""
    add(g, "--bad-image", default="skip", choices=["skip", "error"],
        help="an unreadable image file: 'skip' it (replaced by the next file that loads, logged once) or 'error' "
             "(stop at the first)")
    add(g, "--max-bad-fraction", type=float, default=0.01, metavar="F",
        help="stop once more than this fraction of a folder's images turned out unreadable (0 to 1, default 0.01)")


def check_bad_image_options(args):
    if not 0 <= args.max_bad_fraction <= 1:
        raise UsageError(f"--max-bad-fraction must be in [0, 1], got {args.max_bad_fraction}")


def add_skip_nonfinite(g):
    add(g, "--skip-nonfinite", type=int, default=0, metavar="K",
        help="skip up to K steps whose loss or gradient is not finite (default 0: the first one stops the run, "
             "exit code 3, leaving the last checkpoint untouched)")


class ArgParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see --help)")  # one line, no usage dump


def parse_with_config(parser: ArgParser, argv=None) -> argparse.Namespace:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        try:
            with open(known.config) as f:
                values = yaml.safe_load(f) or {}
        except OSError as e:
            raise UsageError(f"cannot read config {known.config}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise UsageError(f"config {known.config} is not valid YAML: {e}") from None
        if not isinstance(values, dict):
            raise UsageError(f"config {known.config} must be a mapping of option: value")
        dests = {a.dest for a in parser._actions}
        values = {k.replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(values) - dests)
        if unknown:
            raise UsageError(f"config {known.config} has unknown keys: {', '.join(unknown)}")
        parser.set_defaults(**values)
    return parser.parse_args(argv)


def input_size(values):
    """`--input-size 224` (square) or `--input-size 192 256` (height width)."""
    if isinstance(values, int):
        values = [values]
    values = [int(v) for v in values]
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise UsageError(f"--input-size takes one (square) or two (height width) numbers, got {values}")
    return tuple(values)


def to_yaml(args: argparse.Namespace) -> str:
    return yaml.safe_dump({k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()}, sort_keys=True)
