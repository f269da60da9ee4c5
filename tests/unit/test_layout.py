"""The layers and neighbourhoods of the package import only what their docstrings allow."""

from __future__ import annotations

import ast
import importlib
import warnings
from pathlib import Path

import pytest

import soundshard.transforms

TRANSFORMS = Path(soundshard.transforms.__file__).parent

#: What each neighbourhood of transforms/ may import (besides schemas and itself), as its
#: package docstring says. "*" is any of them.
ALLOWED = {
    "io": {"audio", "labels"},
    "audio": {"features.melspec"},
    "labels": set(),
    "features": {"io", "audio", "labels", "levels", "outcomes"},
    "levels": {"outputs"},
    "models": {"audio", "features", "io", "tagging.events"},
    "tagging": {"*"},
    "edge": {"features", "levels", "models"},
    "outputs": {"io", "labels", "levels"},
}


def imported_neighbourhoods(path: Path) -> set[str]:
    """``transforms`` modules a file imports, as ``package`` or ``package.module``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("soundshard."):
            parts = node.module.split(".")
            if parts[1] == "pipelines":
                found.add("pipelines")
            elif parts[1] == "transforms" and len(parts) == 3:
                found |= {f"{parts[2]}.{a.name}" for a in node.names}
            elif parts[1] == "transforms" and len(parts) > 3:
                found.add(".".join(parts[2:4]))
            elif parts[1] == "transforms":
                found |= {a.name for a in node.names}
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_neighbourhoods_import_what_they_say(package):
    allowed = ALLOWED[package]
    for path in sorted((TRANSFORMS / package).glob("*.py")):
        for name in imported_neighbourhoods(path) - {"moved_name"}:
            top = name.split(".")[0]
            if top == package or ("*" in allowed and top != "pipelines"):
                continue
            assert top in allowed or name in allowed, f"transforms/{package}/{path.name} imports {name}"
        assert "soundshard.pipelines" not in path.read_text(), f"{path.name} imports the pipeline layer"


def test_every_module_lives_in_a_neighbourhood():
    flat = sorted(p.name for p in TRANSFORMS.glob("*.py"))
    assert flat == ["__init__.py", "outcomes.py"]
    packages = sorted(p.name for p in TRANSFORMS.iterdir() if (p / "__init__.py").is_file())
    assert packages == sorted(ALLOWED)
    for package in packages:
        doc = importlib.import_module(f"soundshard.transforms.{package}").__doc__
        assert doc and "May import" in doc, package


def test_old_flat_module_names_still_import_with_a_warning():
    with pytest.warns(DeprecationWarning, match="moved to soundshard.transforms.features.melspec"):
        old = importlib.import_module("soundshard.transforms.melspec")
    from soundshard.transforms.features import melspec

    assert old.window_count is melspec.window_count
    assert melspec.__spec__.name == "soundshard.transforms.features.melspec"  # the new module untouched
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        sources = importlib.import_module("soundshard.transforms.sources")
    from soundshard.transforms.io import archives, listing, storage

    assert (sources.from_listing, sources.open_source, sources.RemoteFile) == (
        listing.from_listing,
        archives.open_source,
        storage.RemoteFile,
    )
    with pytest.warns(DeprecationWarning, match="audio.decode.decode_audio"):
        from soundshard.transforms.audio import decode_audio
    from soundshard.transforms.audio.decode import decode_audio as new

    assert decode_audio is new
    with pytest.raises(ImportError):
        from soundshard.transforms.audio import no_such_name  # noqa: F401
