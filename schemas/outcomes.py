"""Where in the pipeline an input can fail: the stages of dead letters (one list)."""

from __future__ import annotations

import enum


class Stage(enum.StrEnum):
    """The stage a dead letter failed at (its ``stage`` column, a plain string in the outputs)."""

    #: Listing: unreadable folders, unsafe archive members, missing or bad annotation files.
    SOURCE = "source"
    #: A manifest row (missing or duplicate file name, file outside the input, bad value).
    MANIFEST = "manifest"
    #: Reading the header and splitting into work units.
    PLAN = "plan"
    #: Reading, mixing down, resampling and checking the samples.
    DECODE = "decode"
    #: Log-mel features of a work unit.
    FEATURES = "features"
    #: Embeddings from a pretrained model.
    EMBED = "embed"
    #: The classifier's scores (``soundshard tag``).
    TAG = "tag"
    #: Outputs that failed after tagging: a recording's picture, an event's snippet.
    PLOTS = "plots"
    SNIPPETS = "snippets"
