"""Inputs and their bookkeeping: listing folders, globs and manifests (``listing.py``), tar and zip
members (``archives.py``), reading object stores (``storage.py``), the output lock and the ledger
of incremental runs (no Beam). May import ``schemas``, ``transforms.audio`` and
``transforms.labels`` (the recording times and annotations a listing attaches to an input).
"""
