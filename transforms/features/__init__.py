"""Features: the log-mel and MFCC maths, OpenL3 and the embedding model handlers, and the Beam stages
that plan, decode and compute a recording's windows (``compute.py``). May import ``schemas``,
``transforms.io``, ``transforms.audio``, ``transforms.labels``, ``transforms.levels`` and
``transforms.outcomes``.
"""


def __getattr__(name: str):
    """Names of the module ``transforms/features.py`` of earlier releases (deprecated)."""
    from soundshard.transforms import moved_name

    return moved_name(__name__, "compute", name)
