"""The window table, declared once: Arrow schema, TFRecord spec and readers come from FIELDS.

Each row is one analysis window. Feature arrays are stored flat (row-major ``[n_mels, n_frames]``)
as an Arrow fixed-size list / a TFRecord float list of ``n_mels * n_frames`` values; the shape is
in the schema metadata and in ``dataset.json``, and the readers here reshape.

Embedding tables (``soundshard embed``) come from the same field list with the feature column
replaced by ``embedding`` (float32, ``[embedding_size]``); their schema metadata also names the
feature column (``soundshard.feature_column``), so the readers find it. A config says which
table it makes: :func:`feature_column_of` and its ``feature_shape``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa

from soundshard.schemas import tfexample
from soundshard.schemas.config import FeatureConfig
from soundshard.schemas.records import WindowBatch

#: Version of the window table layout; bumped on any incompatible change.
SCHEMA_VERSION = 4
#: Prefix of columns copied from the manifest.
EXTRA_PREFIX = "meta_"
FEATURE_COLUMN = "log_mel"


@dataclasses.dataclass(frozen=True)
class Field:
    """One column: ``kind`` is ``string``, ``int32``, ``int64``, ``float64``, ``timestamp`` (UTC,
    microseconds; int64 microseconds since the epoch in TFRecords, -1 when null) or ``features``."""

    name: str
    kind: str
    nullable: bool
    doc: str


FIELDS: tuple[Field, ...] = (
    Field("clip_id", "string", False, "Clip id: path relative to the input root, no extension."),
    Field("source_uri", "string", False, "Path or URL of the audio file (fsspec chained URL for members)."),
    Field("archive_member", "string", True, "Member path inside a tar/zip archive, or null."),
    Field("window_index", "int32", False, "Index of the window within its recording."),
    Field("start_s", "float64", False, "Window start, seconds from the recording start."),
    Field("end_s", "float64", False, "Window end, seconds from the recording start."),
    Field("label", "string", True, "Class name (clip label copied to each window), or null."),
    Field("label_index", "int32", False, "Index of label in dataset.json's label map; -1 if none."),
    Field("fold", "int32", True, "Predefined fold, or null (-1 in TFRecords)."),
    Field("split", "string", True, "Predefined split, or null (empty in TFRecords)."),
    Field("site", "string", True, "Site from the configured path pattern, or null."),
    Field("deployment", "string", True, "Deployment from the configured path pattern, or null."),
    Field("start_utc", "timestamp", True, "Absolute window start (UTC) when the recording start is known."),
    Field("end_utc", "timestamp", True, "Absolute window end (UTC) when the recording start is known."),
    Field("augmentation", "string", True, "Offline augmentation of this copy (pitch_shift=+2), or null."),
    Field(FEATURE_COLUMN, "features", False, "Log-mel window, flat row-major [n_mels, n_frames]."),
    Field("feature_fingerprint", "string", False, "FeatureConfig.fingerprint of the features."),
)


def feature_column_of(config) -> str:
    """Name of the feature column of ``config``'s table: ``log_mel``, or ``embedding``."""
    return getattr(config, "feature_column", FEATURE_COLUMN)


def fields_of(config) -> tuple[Field, ...]:
    """FIELDS of ``config``'s table: the feature column named and described for its config."""
    column = feature_column_of(config)
    if column == FEATURE_COLUMN:
        return FIELDS
    shape = ", ".join(str(n) for n in config.feature_shape)
    feature = Field(column, "features", False, f"Embedding of the window, [{shape}].")
    fingerprint = Field(
        "feature_fingerprint", "string", False, "EmbeddingConfig.fingerprint of the embedding."
    )
    replaced = {"features": feature, "feature_fingerprint": fingerprint}
    return tuple(replaced.get(f.kind if f.kind == "features" else f.name, f) for f in FIELDS)


def _feature_size(config) -> int:
    return math.prod(config.feature_shape)


_ARROW_TYPES = {
    "string": pa.string(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float64": pa.float64(),
    "timestamp": pa.timestamp("us", tz="UTC"),
}


def extra_fields(extra_columns: Sequence[str]) -> tuple[Field, ...]:
    """Fields for manifest columns kept as strings (``meta_<name>``)."""
    return tuple(
        Field(EXTRA_PREFIX + name, "string", True, f"Manifest column {name!r}.") for name in extra_columns
    )


def arrow_schema(config: FeatureConfig, extra_columns: Sequence[str] = ()) -> pa.Schema:
    """Arrow schema of the window table for ``config`` (FeatureConfig or EmbeddingConfig; the
    feature size is fixed by the config)."""
    return _arrow_schema(config, tuple(extra_columns))


@functools.lru_cache(maxsize=16)
def _arrow_schema(config: FeatureConfig, extra_columns: tuple[str, ...]) -> pa.Schema:
    n_values = _feature_size(config)
    columns = []
    for field in fields_of(config) + extra_fields(extra_columns):
        if field.kind == "features":
            arrow_type = pa.list_(pa.float32(), n_values)
        else:
            arrow_type = _ARROW_TYPES[field.kind]
        columns.append(pa.field(field.name, arrow_type, nullable=field.nullable))
    metadata = {
        "soundshard.schema_version": str(SCHEMA_VERSION),
        "soundshard.feature_shape": json.dumps(list(config.feature_shape)),
        "soundshard.feature_fingerprint": config.fingerprint,
    }
    column = feature_column_of(config)
    if column != FEATURE_COLUMN:  # log-mel tables keep their metadata as it always was
        metadata["soundshard.feature_column"] = column
    return pa.schema(columns, metadata=metadata)


def tf_feature_spec(config: FeatureConfig, extra_columns: Sequence[str] = ()) -> dict:
    """``tf.io.parse_example`` spec for the TFRecord shards (imports TensorFlow)."""
    import tensorflow as tf

    spec = {}
    for field in fields_of(config) + extra_fields(extra_columns):
        if field.kind == "features":
            spec[field.name] = tf.io.FixedLenFeature([_feature_size(config)], tf.float32)
        elif field.kind == "string":
            spec[field.name] = tf.io.FixedLenFeature([], tf.string, default_value="")
        elif field.kind in ("int32", "int64", "timestamp"):
            spec[field.name] = tf.io.FixedLenFeature([], tf.int64, default_value=-1)
        else:
            spec[field.name] = tf.io.FixedLenFeature([], tf.float32)
    return spec


def batch_to_table(
    batch: WindowBatch,
    *,
    config: FeatureConfig,
    label_map: dict[str, int],
    extra_columns: Sequence[str] = (),
) -> pa.Table:
    """Arrow table (one row per window) of a :class:`WindowBatch`, in :func:`arrow_schema`.

    ``batch.features`` is ``[n_windows, *config.feature_shape]`` (log-mel windows or embeddings).
    """
    n = batch.n_windows
    source = batch.source
    extras = dict(source.extra)
    flat = pa.array(batch.features.reshape(-1), type=pa.float32())
    columns = {
        "clip_id": pa.array([source.clip_id] * n, pa.string()),
        "source_uri": pa.array([source.public_uri] * n, pa.string()),
        "archive_member": pa.array([source.archive_member] * n, pa.string()),
        "window_index": pa.array(np.arange(n, dtype=np.int32) + batch.first_window_index),
        "start_s": pa.array(batch.start_s, pa.float64()),
        "end_s": pa.array(batch.end_s, pa.float64()),
        "label": pa.array([source.label] * n, pa.string()),
        "label_index": pa.array(
            np.full(n, label_map.get(source.label, -1) if source.label is not None else -1, np.int32)
        ),
        "fold": pa.array([source.fold] * n, pa.int32()),
        "split": pa.array([source.split] * n, pa.string()),
        "site": pa.array([source.site] * n, pa.string()),
        "deployment": pa.array([source.deployment] * n, pa.string()),
        "start_utc": _utc_column(source.recording_start_us, batch.start_s),
        "end_utc": _utc_column(source.recording_start_us, batch.end_s),
        "augmentation": pa.array([source.augmentation] * n, pa.string()),
        feature_column_of(config): pa.FixedSizeListArray.from_arrays(flat, _feature_size(config)),
        "feature_fingerprint": pa.array([config.fingerprint] * n, pa.string()),
    }
    for name in extra_columns:
        columns[EXTRA_PREFIX + name] = pa.array([extras.get(name)] * n, pa.string())
    schema = arrow_schema(config, extra_columns)
    return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)


def _utc_column(recording_start_us: int | None, offsets_s: np.ndarray) -> pa.Array:
    timestamp = _ARROW_TYPES["timestamp"]
    if recording_start_us is None:
        return pa.nulls(len(offsets_s), timestamp)
    micros = recording_start_us + np.round(np.asarray(offsets_s) * 1e6).astype(np.int64)
    return pa.array(micros, pa.int64()).cast(timestamp)


def table_to_examples(table: pa.Table) -> Iterator[bytes]:
    """Serialised ``tf.train.Example`` per row of a window table (nulls are left out)."""
    kinds = {f.name: f.kind for f in FIELDS}
    per_column = []
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        kind = "features" if pa.types.is_fixed_size_list(column.type) else kinds.get(name, "string")
        if kind == "features":
            values = column.values.to_numpy(zero_copy_only=False).reshape(-1, column.type.list_size)
            per_column.append([tfexample.feature_entry(name, tfexample.float_feature(v)) for v in values])
            continue
        if kind == "timestamp":
            column, kind = column.cast(pa.int64()), "int64"
        cache: dict = {}
        entries = []
        for value in column.to_pylist():
            entry = cache.get(value)
            if entry is None:
                entry = cache[value] = _scalar_entry(name, kind, value)
            entries.append(entry)
        per_column.append(entries)
    for row_entries in zip(*per_column, strict=True):
        yield tfexample.encode_entries(row_entries)


def _scalar_entry(name: str, kind: str, value) -> bytes:
    if value is None:
        return b""
    if kind == "string":
        feature = tfexample.bytes_feature([value.encode()])
    elif kind in ("int32", "int64"):
        feature = tfexample.int64_feature([value])
    else:
        feature = tfexample.float_feature(np.asarray([value]))
    return tfexample.feature_entry(name, feature)


def feature_shape_of(schema: pa.Schema) -> tuple[int, ...]:
    """Feature shape recorded in a window table's schema metadata: ``(n_mels, n_frames)`` for
    log-mel tables, ``(embedding_size,)`` for embedding tables."""
    raw = (schema.metadata or {}).get(b"soundshard.feature_shape")
    if raw is None:
        raise ValueError("schema has no soundshard.feature_shape metadata: not a soundshard shard")
    return tuple(int(n) for n in json.loads(raw))


def feature_column_in(schema: pa.Schema) -> str:
    """Feature column named in a window table's schema metadata (``log_mel`` when not named)."""
    raw = (schema.metadata or {}).get(b"soundshard.feature_column")
    return raw.decode() if raw else FEATURE_COLUMN


def read_parquet_windows(paths: str | Sequence[str]) -> tuple[pa.Table, np.ndarray]:
    """Reads Parquet window shards.

    Args:
        paths: One shard path or several (local or any pyarrow filesystem URI).

    Returns:
        ``(table, features)``: the table without the feature column, and float32 features in
        the same row order: ``[n_rows, n_mels, n_frames]`` (log-mel shards) or
        ``[n_rows, embedding_size]`` (embedding shards); the column and shape come from the
        schema metadata.
    """
    import pyarrow.parquet as pq

    paths = [paths] if isinstance(paths, str) else list(paths)
    return split_features(pa.concat_tables([pq.read_table(p) for p in paths]))


def split_features(table: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """``(table without the feature column, float32 features)`` of a window table read from shards
    (column and shape from the schema metadata; see :func:`read_parquet_windows`)."""
    shape = feature_shape_of(table.schema)
    column = feature_column_in(table.schema)
    values = table.column(column).combine_chunks().values.to_numpy(zero_copy_only=False)
    features = values.reshape(table.num_rows, *shape)
    return table.drop_columns([column]), features


def tfrecord_dataset(paths: str | Sequence[str], config: FeatureConfig, extra_columns: Sequence[str] = ()):
    """``tf.data.Dataset`` of parsed windows; ``log_mel`` is reshaped to ``[n_mels, n_frames]``
    (``embedding`` of an EmbeddingConfig's shards to ``[embedding_size]``)."""
    import tensorflow as tf

    spec = tf_feature_spec(config, extra_columns)
    shape = list(config.feature_shape)
    column = feature_column_of(config)

    def parse(record):
        example = tf.io.parse_single_example(record, spec)
        example[column] = tf.reshape(example[column], shape)
        return example

    files = [paths] if isinstance(paths, str) else list(paths)
    return tf.data.TFRecordDataset(files).map(parse)
