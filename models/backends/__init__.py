"""Sparse-execution backends: one interface, `backend(encoder, imgs, mask) -> (N, C4, rows, cols)`.

All read the encoder's timm-named parameters, so weights never move or get renamed when the backend changes.
"""
from .dense import DenseBackend
from .sparse import SparseBackend


def _minkowski():
    from .minkowski import MinkowskiBackend  # lazy: MinkowskiEngine is an optional extra

    return MinkowskiBackend


BACKENDS = {"sparse": lambda: SparseBackend, "dense": lambda: DenseBackend, "minkowski": _minkowski}


def make_backend(name: str):
    if name not in BACKENDS:
        raise ValueError(f"unknown backend '{name}'; valid backends: {', '.join(BACKENDS)}")
    return BACKENDS[name]()()
