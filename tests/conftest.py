"""Shared fixtures, and the tier marks.

The suite is in tiers, one folder each, marked by folder: ``unit`` (functions and classes, no
pipeline), ``beam`` (Beam stages and single pipeline runs on the in-process runner), ``e2e``
(commands and their chains as a user runs them), ``integration`` (object-store emulators, the
portable runner, gRPC workers, the container files). ``pytest -m unit`` runs one tier; ``-m "not
slow"`` leaves out the runs that take seconds to a minute each.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TIERS = ("unit", "beam", "e2e", "integration")


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture
def beam_runner():
    """The in-process FnApiRunner (never the DirectRunner's Prism download)."""
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    return FnApiRunner()


def _use_env(env: dict) -> dict:
    """Sets ``env`` in os.environ and in fsspec's config (read from FSSPEC_* at import time)."""
    import os

    import fsspec.config

    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    fsspec.config.set_conf_env(fsspec.config.conf)
    return saved


def _restore_env(saved: dict) -> None:
    import os

    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def gcs_env(tmp_path_factory):
    """A GCS emulator (and token endpoint) on 127.0.0.1 for the whole session; yields its env.

    One per session: gcsfs caches filesystem instances and Beam caches credentials per process.
    """
    from .emulators import gcs_emulator

    with gcs_emulator(tmp_path_factory.mktemp("gcs")) as env:
        saved = _use_env(env)
        try:
            yield env
        finally:
            _restore_env(saved)


@pytest.fixture(scope="session")
def s3_env(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 for the whole session; yields its env."""
    from .emulators import s3_emulator

    with s3_emulator(tmp_path_factory.mktemp("s3")) as env:
        saved = _use_env(env)
        try:
            yield env
        finally:
            _restore_env(saved)


@pytest.fixture(scope="session")
def demo_features(tmp_path_factory):
    """Log-mel Parquet shards of the demo set (4 classes × 8 clips, folds 1-4), made once."""
    from soundshard.pipelines import features
    from soundshard.pipelines.demo import make_dataset

    root = tmp_path_factory.mktemp("demo")
    manifest = make_dataset(str(root))
    out = root / "features"
    argv = ["--input", str(root / "audio"), "--manifest", manifest, "--output", str(out)]
    argv += ["--format", "parquet"]
    assert features.run(argv) == 0
    return out


@pytest.fixture(scope="session")
def demo_model(demo_features, tmp_path_factory):
    """The edge-sized CNN trained briefly on the demo set (fold 1 held out), made once."""
    from soundshard.pipelines import train

    folder = tmp_path_factory.mktemp("model") / "edgecnn"
    argv = [
        "--features",
        str(demo_features),
        "--arch",
        "edgecnn",
        "--test-fold",
        "1",
        "--output",
        str(folder),
    ]
    assert train.run([*argv, "--epochs", "20", "--batch-size", "16", "--quiet"]) == 0  # as the demo
    return folder


@pytest.fixture(autouse=True)
def _default_storage_settings():
    """Each test starts from the default storage settings (a run makes its own the process's)."""
    yield
    from soundshard.schemas.storage import StorageConfig
    from soundshard.transforms.io import storage

    storage.configure(StorageConfig())
