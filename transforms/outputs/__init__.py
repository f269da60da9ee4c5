"""What runs write: window shards, dead letters and dataset.json (``shards.py``), tables of the tag
and features runs (``tables.py``), committed last. May import ``schemas``, ``transforms.io``,
``transforms.labels`` and ``transforms.levels``.
"""
