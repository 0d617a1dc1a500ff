"""`python -m fcmae.pretrain`: --help and --version are answered from the options alone, before the training code
imports torch and timm (seconds)."""
from fcmae.runtime.options import answer_help

from .options import build_parser


def main(argv=None):
    answer_help(build_parser, argv)
    from .cli import cli

    cli(argv)


if __name__ == "__main__":
    main()
