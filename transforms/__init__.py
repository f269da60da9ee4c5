"""How data flows: pure numpy steps and the Beam transforms that adapt them, by stage.

- ``io/``: listing, archives, object stores, the output lock, the ledger of incremental runs.
- ``audio/``: decoding, work units, window grids, augmentation, recording times, synthetic sounds.
- ``labels/``: annotation files and the strong labels of windows.
- ``features/``: log-mel/MFCC maths, OpenL3 and embedding models, the decode-and-compute stage.
- ``levels/``: the sound-level meter and the levels tables.
- ``models/``: architectures, training data and metrics, callbacks, multi-worker training.
- ``tagging/``: window scores to events, files and summaries; event rules; plots; snippets;
  scoring against references; streaming.
- ``edge/``: the int8 artifact and its C sources.
- ``outputs/``: window shards, tables and the commit of a run's outputs.
- ``outcomes.py``: dead letters and the counters every outcome is counted in.

Modules may import ``schemas`` and the neighbourhoods their package docstring names, never
``pipelines``. The flat module names of earlier releases (``soundshard.transforms.melspec``,
``...sources``) still import, and the names of the flat modules that are packages now
(``soundshard.transforms.audio.decode_audio``), with a ``DeprecationWarning``, for one release.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

#: Flat module names of earlier releases → where they live now.
MOVED = {
    "lock": "io.lock",
    "ledger": "io.ledger",
    "units": "audio.units",
    "framing": "audio.framing",
    "augment": "audio.augment",
    "recordings": "audio.recordings",
    "synth": "audio.synth",
    "annotations": "labels.annotations",
    "strong_labels": "labels.strong_labels",
    "melspec": "features.melspec",
    "openl3": "features.openl3",
    "embeddings": "features.embeddings",
    "level_tables": "levels.level_tables",
    "training": "models.training",
    "callbacks": "models.callbacks",
    "distributed": "models.distributed",
    "calibration": "tagging.calibration",
    "events": "tagging.events",
    "plots": "tagging.plots",
    "snippets": "tagging.snippets",
    "scoring": "tagging.scoring",
    "streaming": "tagging.streaming",
    "cexport": "edge.cexport",
    "shards": "outputs.shards",
    "tables": "outputs.tables",
    "sources": ("io.listing", "io.archives", "io.storage"),
}


class _MovedModule(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old flat module name as the module that holds its code now."""

    def find_spec(self, fullname, path=None, target=None):
        old = fullname.removeprefix(__name__ + ".")
        if old == fullname or old not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        old = spec.name.removeprefix(__name__ + ".")
        new = MOVED[old]
        warnings.warn(
            f"{spec.name} moved to {', '.join(f'{__name__}.{n}' for n in _homes(new))}",
            DeprecationWarning,
            stacklevel=2,
        )
        # A module of its own that holds the names of the new ones: the new modules keep their
        # own __spec__ (importlib sets the spec of what create_module returns).
        alias = types.ModuleType(spec.name, f"Moved to {', '.join(_homes(new))}.")
        for home in _homes(new):
            module = importlib.import_module(f"{__name__}.{home}")
            alias.__dict__.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
        return alias

    def exec_module(self, module):
        pass


def moved_name(package: str, module: str, name: str):
    """``package.name`` where ``package`` was the flat module ``module`` holds now (deprecated).

    For the packages whose names were modules of earlier releases (``audio``, ``features``,
    ``levels``, ``models``, ``tagging``, ``edge``): their ``__getattr__`` calls this. Submodules
    of the package are left to the import system.
    """
    if name.startswith("__") or importlib.util.find_spec(f"{package}.{name}") is not None:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
    except AttributeError:
        raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
    warnings.warn(f"{package}.{name} moved to {package}.{module}.{name}", DeprecationWarning, stacklevel=3)
    return value


def _homes(new: str | tuple[str, ...]) -> tuple[str, ...]:
    return (new,) if isinstance(new, str) else new


if not any(isinstance(finder, _MovedModule) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModule())
