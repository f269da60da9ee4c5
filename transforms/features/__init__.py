"""Features: the log-mel and MFCC maths, OpenL3 and the embedding model handlers, and the Beam stages
that plan, decode and compute a recording's windows (``compute.py``). May import ``schemas``,
``transforms.io``, ``transforms.audio``, ``transforms.labels``, ``transforms.levels`` and
``transforms.outcomes``.
"""
