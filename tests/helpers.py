"""Helpers for tests: shared data locations and synthetic audio."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SOUNDSHARD_SHARED_DATA", ROOT.parent / "shared" / "data"))
ESC10 = SHARED_DATA / "esc10"


def require_esc10() -> Path:
    """Skips the calling test when ../shared/data/esc10 is absent (a fresh clone)."""
    if not (ESC10 / "meta.csv").is_file():
        pytest.skip(f"ESC-10 data not found at {ESC10} (../shared is absent in a fresh clone)")
    return ESC10


def tone(
    *,
    sample_rate_hz: int = 22050,
    duration_s: float = 1.0,
    freq_hz: float = 440.0,
    channels: int = 1,
    seed: int = 0,
) -> np.ndarray:
    """A sine plus a little noise, float32 ``[n]`` or ``[n, channels]``."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(sample_rate_hz * duration_s))) / sample_rate_hz
    y = 0.5 * np.sin(2 * np.pi * freq_hz * t) + 0.01 * rng.standard_normal(len(t))
    if channels > 1:
        y = np.stack([y * (c + 1) / channels for c in range(channels)], axis=1)
    return y.astype(np.float32)


def write_audio(path: Path, y: np.ndarray, sample_rate_hz: int, subtype: str | None = None) -> Path:
    """Writes ``y`` with soundfile (format from the extension)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), y, sample_rate_hz, subtype=subtype)
    return path


#: Addresses a loopback-only socket may be reported at (IPv4 sockets may be listed as v4-mapped).
LOOPBACK_ADDRESSES = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})


def listening_sockets(pid: int | None = None) -> set[tuple[str, int]]:
    """``(address, port)`` of every listening TCP socket of process ``pid`` (default: this one) and
    its descendants."""
    import psutil

    found = set()
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                for conn in proc.net_connections(kind="inet"):
                    if conn.status == psutil.CONN_LISTEN:
                        found.add((conn.laddr.ip, conn.laddr.port))
    return found


@contextlib.contextmanager
def watch_listening(pid: int | None = None, *, interval_s: float = 0.05) -> Iterator[set[tuple[str, int]]]:
    """Collects the listening sockets of a process tree (default: this process's) while the block
    runs, sampled every ``interval_s``; yields the set, filled in as they are seen.

    Sockets that existed before the block are left out, so a server of another test (an emulator
    of this session) does not count.
    """
    before = listening_sockets(pid)
    seen: set[tuple[str, int]] = set()
    stop = threading.Event()

    def sample():
        while True:
            seen.update(listening_sockets(pid) - before)
            if stop.wait(interval_s):
                return

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()
        seen.update(listening_sockets(pid) - before)


def not_loopback(sockets: set[tuple[str, int]]) -> set[tuple[str, int]]:
    """The sockets of ``sockets`` that listen on more than loopback."""
    return {(ip, port) for ip, port in sockets if ip not in LOOPBACK_ADDRESSES}


def copy_model_folder(source: Path, target: Path) -> Path:
    """A copy of a trained model folder (``soundshard train`` output) to edit in a test."""
    import shutil

    shutil.copytree(source, target)
    return target


def reseal_model_folder(folder: Path) -> dict:
    """Recomputes ``model.json``'s integrity digest after a test edited the folder on purpose (as a
    folder crafted to pass the digest would be), so that the checks behind the digest are reached.

    Returns:
        The new model.json content.
    """
    import json

    from soundshard.transforms.models import architectures as models

    path = folder / "model.json"
    description = json.loads(path.read_text())
    model_path = os.path.normpath(os.path.join(folder, description.get("model_file", "model.keras")))
    description[models.INTEGRITY] = models.integrity_of(
        description, model_file_sha256=models.file_sha256(model_path)
    )
    path.write_text(json.dumps(description, indent=2))
    return description
