"""ConvNeXt V2 FCMAE pretraining and fine-tuning."""

__version__ = "0.2.0"  # the version pyproject.toml declares; --version reads the installed metadata first
