"""soundshard from Python (notebooks, scripts): the commands as functions, with the same checks
and the same outputs as the ``soundshard`` command line.

    import soundshard

    soundshard.features("../shared/data/esc10/audio", "out/esc10", manifest="../shared/data/esc10/meta.csv")
    meta, windows = soundshard.load_windows("out/esc10")      # a DataFrame and [n, n_mels, n_frames]
    metrics = soundshard.train("out/esc10", "models/esc10-f4", arch="edgecnn", test_fold=4)
    events = soundshard.tag("../shared/data/longform", "models/esc10-f4")   # a DataFrame of events

Keyword options are the commands' flags (``test_fold=4`` is ``--test-fold 4``; ``True`` gives a
switch, a list repeats the flag). A configuration error raises :class:`CommandError` with exit
code 2 and the command's one-line message, before anything is read or written; a run whose
inputs all failed (or too many: ``--max-failed-fraction``) raises it with the command's code
after writing its outputs and dead letters.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["CommandError", "__version__", "features", "load_windows", "score", "tag", "train"]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("soundshard")
    except PackageNotFoundError:  # a checkout that is not installed
        return "unknown"


__version__ = _version()


class CommandError(RuntimeError):
    """A command ended with a non-zero exit code.

    Attributes:
        code: The exit code (2: configuration error; see the README's exit codes).
        message: The command's error message (its last ``error:`` line), or the exit code.
    """

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _argv(positional: Sequence[tuple[str, Any]], options: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for name, value in [*positional, *options.items()]:
        flag = "--" + name
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv.append(f"{flag}={value}")
    return argv


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self._streams = streams

    def write(self, text: str) -> int:
        for stream in self._streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self._streams:
            stream.flush()


def _run(run: Callable[[list[str]], int], argv: list[str], *, prog: str) -> None:
    captured = io.StringIO()
    with contextlib.redirect_stderr(_Tee(sys.stderr, captured)):
        code = run(argv)
    if code != 0:
        errors = [line for line in captured.getvalue().splitlines() if line.startswith(f"{prog}: error:")]
        raise CommandError(code, errors[-1] if errors else f"{prog} exited with code {code}")


def _read_json(path: str) -> dict:
    import json

    import fsspec

    with fsspec.open(path, "rt") as f:
        return json.load(f)


def features(input: str, output: str, **options) -> dict:
    """``soundshard features``: audio → log-mel windows in ``output``; returns its
    ``dataset.json`` (counts, figures, shards). E.g. ``manifest=``, ``labels=True``,
    ``n_mels=40``, ``format="parquet"``."""
    from soundshard.pipelines import features as command

    _run(command.run, _argv([("input", input), ("output", output)], options), prog="soundshard features")
    return _read_json(f"{output.rstrip('/')}/dataset.json")


def train(data: str | Sequence[str], output: str, **options) -> dict:
    """``soundshard train``: a model folder at ``output`` from one features output or several;
    returns its test metrics (``metrics.json``). E.g. ``arch="edgecnn"``, ``test_fold=4``,
    ``background="out/negatives"``, ``epochs=30``."""
    from soundshard.pipelines import train as command

    data = [data] if isinstance(data, str) else list(data)
    argv = _argv(
        [("features", data), ("output", output)], {k.replace("_", "-"): v for k, v in options.items()}
    )
    _run(command.run, argv, prog="soundshard train")
    return _read_json(f"{output.rstrip('/')}/metrics.json")


def tag(input: str, model: str, output: str | None = None, **options):
    """``soundshard tag``: tags recordings with a model folder; returns the events as a pandas
    DataFrame (one row per event: clip, label, start and end in seconds and UTC, confidence). The
    tables, label files and ``run.json`` stay in ``output`` when given, else they are removed.
    E.g. ``audacity=True``, ``min_level_above_floor_db="off"``."""
    import tempfile

    import pandas as pd
    import pyarrow.parquet as pq

    from soundshard.pipelines import tag as command

    with contextlib.ExitStack() as stack:
        folder = output or stack.enter_context(tempfile.TemporaryDirectory(prefix="soundshard-tag-"))
        argv = _argv([("input", input), ("model-dir", model), ("output", folder)], options)
        _run(command.run, argv, prog="soundshard tag")
        manifest = _read_json(f"{folder.rstrip('/')}/run.json")
        parts = manifest.get("tables", {}).get("events", [])
        tables = [pq.read_table(f"{folder.rstrip('/')}/{p}") for p in parts if p.endswith(".parquet")]
        if not tables:
            return pd.DataFrame(columns=["clip_id", "label", "start_s", "end_s", "confidence"])
        import pyarrow as pa

        return pa.concat_tables(tables).to_pandas().sort_values(["clip_id", "start_s"], ignore_index=True)


def score(reference: str, tags: str, **options) -> dict:
    """``soundshard score``: a tag output against reference annotations; returns ``score.json``
    (segment and event metrics per class and overall, segment average precision)."""
    from soundshard.pipelines import score as command

    _run(command.run, _argv([("reference", reference), ("tags", tags)], options), prog="soundshard score")
    return _read_json(f"{tags.rstrip('/')}/score/score.json")


def load_windows(folder: str):
    """The windows of a features or embedding output (the folder itself, local or remote; every
    night of a nightly one): ``(pandas DataFrame of the columns but the features, float32
    features [n_windows, ...])``.

    Raises:
        soundshard.schemas.errors.ConfigError: not a features output, or one without Parquet shards.
    """
    from soundshard.schemas import fields
    from soundshard.transforms.models import training

    dataset = training.read_dataset_json(folder)
    table, values = fields.split_features(training.read_window_table(folder, dataset))
    return table.to_pandas(), values
