"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture
def beam_runner():
    """The in-process FnApiRunner (never the DirectRunner's Prism download)."""
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    return FnApiRunner()
