"""Sparse-execution backends: one interface, `backend(encoder, imgs, mask, keep=None) -> (N, C4, rows, cols)`.

`keep`, when given, promises exactly that many visible cells in every image (the FCMAE path); the sparse backend
then builds its indices with static shapes and no host synchronisation (see sparse.visible_cells).

All read the encoder's timm-named parameters, so weights never move or get renamed when the backend changes.
"""


def _sparse():  # each backend is imported when made: this registry is light (--help lists its names)
    from .sparse import SparseBackend

    return SparseBackend


def _dense():
    from .dense import DenseBackend

    return DenseBackend


def _minkowski():
    from .minkowski import MinkowskiBackend  # lazy: MinkowskiEngine is an optional extra

    return MinkowskiBackend


def _naive():
    from .naive import NaiveBackend  # the masking ablation: dense convs that leak through masked sites

    return NaiveBackend


BACKENDS = {"sparse": _sparse, "dense": _dense, "minkowski": _minkowski, "naive": _naive}


def make_backend(name: str):
    if name not in BACKENDS:
        raise ValueError(f"unknown backend '{name}'; valid backends: {', '.join(BACKENDS)}")
    return BACKENDS[name]()()
