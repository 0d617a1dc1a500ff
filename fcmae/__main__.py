from .pretrain import cli

cli()
