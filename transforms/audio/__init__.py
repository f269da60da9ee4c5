"""Audio before features: decoding (``decode.py``), work units, window grids, offline augmentation,
recording times and the demo's synthetic sounds (numpy, soundfile, soxr; no Beam). May import
``schemas`` and ``transforms.features.melspec`` (the window count of a recording).
"""


def __getattr__(name: str):
    """Names of the module ``transforms/audio.py`` of earlier releases (deprecated)."""
    from soundshard.transforms import moved_name

    return moved_name(__name__, "decode", name)
