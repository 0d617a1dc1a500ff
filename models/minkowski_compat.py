"""Lazy, patched import of MinkowskiEngine 0.5.4.

0.5.4 still does `from collections import Sequence` (removed in Python 3.10); we alias it before the
first import instead of editing the installed files.
"""
import collections
import collections.abc

INSTALL_HINT = (
    "MinkowskiEngine is not installed. Run `bash tools/setup.sh` (it builds MinkowskiEngine 0.5.4 CPU-only, "
    "about 8 minutes), or see docs/at-scale.md, section 'MinkowskiEngine'."
)


def import_minkowski():
    """Return the MinkowskiEngine module, or raise ImportError naming the install step."""
    if not hasattr(collections, "Sequence"):
        collections.Sequence = collections.abc.Sequence
    try:
        import MinkowskiEngine as ME
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} (import failed: {e})") from e
    return ME
