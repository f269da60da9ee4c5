"""Inputs and outputs' bookkeeping: listing, archives, object stores, the output lock and the ledger
of incremental runs (no Beam). May import ``schemas`` and
``transforms.audio``/``transforms.labels`` (for what a listing attaches to an input).
"""
