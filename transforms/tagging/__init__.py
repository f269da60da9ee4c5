"""From windows to what people read: the Beam stage that scores windows and builds a recording's
results (``classify.py``), events, event rules set on validation recordings, plots, snippets,
scoring against references and streaming (``listen``). May import every other neighbourhood of
``transforms``.
"""
