"""The edge artifact: int8 quantisation, TFLite Micro runs and arena measurement (``artifact.py``),
and the C sources of the model, features and levels (``cexport.py``). May import ``schemas``,
``transforms.features``, ``transforms.levels`` and ``transforms.models``.
"""


def __getattr__(name: str):
    """Names of the module ``transforms/edge.py`` of earlier releases (deprecated)."""
    from soundshard.transforms import moved_name

    return moved_name(__name__, "artifact", name)
