"""The FCMAE pretraining stage: `python -m fcmae.pretrain` (fcmae/pretrain/cli.py)."""
