from fcmae.pretrain.cli import cli

cli()
