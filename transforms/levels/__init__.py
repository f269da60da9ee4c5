"""Sound levels: the sound-level meter (weightings, time weightings, Leq, percentiles, bands;
``meter.py``, numpy and scipy, its per-sample loops compiled with numba in ``kernels.py``) and the
levels tables (``level_tables.py``). May import ``schemas`` and ``transforms.outputs`` (the table
rows).
"""


def __getattr__(name: str):
    """Names of the module ``transforms/levels.py`` of earlier releases (deprecated)."""
    from soundshard.transforms import moved_name

    return moved_name(__name__, "meter", name)
