"""From windows to what people read: the Beam stage that scores windows and builds a recording's
results (``classify.py``), events, event rules set on validation recordings, plots, snippets,
a tag run's files for the commit (``commit.py``), scoring against references and streaming
(``soundshard listen``). May import every other neighbourhood of ``transforms``.
"""


def __getattr__(name: str):
    """Names of the module ``transforms/tagging.py`` of earlier releases (deprecated)."""
    from soundshard.transforms import moved_name

    return moved_name(__name__, "classify", name)
