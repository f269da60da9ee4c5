"""What runs write: window shards, dead letters and dataset.json (``shards.py``), tables of the tag
and features runs (``tables.py``), the run's totals (``totals.py``), and the one commit every run
ends in (``commit.py``: files into place, ledger, manifest last). May import ``schemas``,
``transforms.io``, ``transforms.labels`` and ``transforms.levels``.
"""
