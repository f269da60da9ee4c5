"""The edge artifact: int8 quantisation, TFLite Micro runs and arena measurement (``artifact.py``),
and the C sources of the model, features and levels (``cexport.py``). May import ``schemas``,
``transforms.features``, ``transforms.levels`` and ``transforms.models``.
"""
