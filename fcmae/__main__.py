"""`python -m fcmae`: the pretraining stage (fcmae/pretrain/__main__.py answers --help before torch loads)."""
from fcmae.pretrain.__main__ import main

main()
