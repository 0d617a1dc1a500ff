"""The values of the models' string options, importable without torch: --help lists them before torch loads
(models/grn.py checks against them; the backends' names are the keys of the light models.backends.BACKENDS)."""

GRN_STATS = ("sample", "batch")  # GRN's statistics: per image ('sample') or over the per-device batch ('batch')
