"""The window table, declared once: Arrow schema, TFRecord spec and readers come from FIELDS.

Each row is one analysis window. Feature arrays are stored flat (row-major ``[n_mels, n_frames]``)
as an Arrow fixed-size list / a TFRecord float list of ``n_mels * n_frames`` values; the shape is
in the schema metadata and in ``dataset.json``, and the readers here reshape.

Embedding tables (``soundshard embed``) come from the same field list with the feature column
replaced by ``embedding`` (float32, ``[embedding_size]``); their schema metadata also names the
feature column (``soundshard.feature_column``), so the readers find it. A config says which
table it makes: :func:`feature_column_of` and its ``feature_shape``.

Labels: ``label`` / ``label_index`` hold one class per window (a weak clip label, or a strongly
labelled window's single label); ``labels`` holds a strongly labelled window's label list (``[]``
for background) and ``strong`` says whether the row's recording was annotated. :func:`multi_hot`
turns them into training targets.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa

from soundshard.schemas import tfexample
from soundshard.schemas.config import FeatureConfig
from soundshard.schemas.records import WindowBatch

#: Version of the window table layout; bumped on any incompatible change (5: ``labels`` and
#: ``strong``, the strong labels of annotated recordings).
SCHEMA_VERSION = 5
#: Prefix of columns copied from the manifest.
EXTRA_PREFIX = "meta_"
FEATURE_COLUMN = "log_mel"


@dataclasses.dataclass(frozen=True)
class Field:
    """One column: ``kind`` is ``string``, ``int32``, ``int64``, ``float64``, ``timestamp`` (UTC,
    microseconds; int64 microseconds since the epoch in TFRecords, -1 when null), ``bool`` (int64
    0/1 in TFRecords), ``string_list`` (Arrow ``list<string>``; a variable-length bytes feature in
    TFRecords, no values when null or empty) or ``features``."""

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
    Field(
        "label",
        "string",
        True,
        "Class name: the clip label copied to each window (weak), or for a strongly labelled "
        "window its one label; null when it has none or several.",
    ),
    Field("label_index", "int32", False, "Index of label in dataset.json's label map; -1 if none."),
    Field(
        "labels",
        "string_list",
        True,
        "Strong labels: sorted names of the annotations the window overlaps, [] for background; "
        "null when the recording has no annotation file (weakly labelled or unlabelled).",
    ),
    Field("strong", "bool", False, "True when the recording's windows are labelled from annotations."),
    Field("fold", "int32", True, "Predefined fold, or null (-1 in TFRecords)."),
    Field("split", "string", True, "Predefined split, or null (empty in TFRecords)."),
    Field("site", "string", True, "Site from the configured path pattern, or null."),
    Field("deployment", "string", True, "Deployment from the configured path pattern, or null."),
    Field("start_utc", "timestamp", True, "Absolute window start (UTC) when the recording start is known."),
    Field("end_utc", "timestamp", True, "Absolute window end (UTC) when the recording start is known."),
    Field("augmentation", "string", True, "Offline augmentation of this copy (pitch_shift=+2), or null."),
    Field(
        FEATURE_COLUMN,
        "features",
        False,
        "Log-mel window, flat row-major [n_mels, n_frames] (MFCC [n_mfcc * (1 + deltas), n_frames] "
        "when the feature config's feature_type is mfcc).",
    ),
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
    "bool": pa.bool_(),
    # Named as Parquet names list items, so a table read back from a shard has the same schema.
    "string_list": pa.list_(pa.field("element", pa.string())),
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
        elif field.kind == "string_list":
            spec[field.name] = tf.io.VarLenFeature(tf.string)
        elif field.kind == "bool":
            spec[field.name] = tf.io.FixedLenFeature([], tf.int64, default_value=0)
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
    Windows of a strongly labelled source (``source.annotations`` set) take ``labels`` from
    ``batch.labels`` and ``label`` from it when they have exactly one; others take the clip label.

    Raises:
        ValueError: a strongly labelled source whose batch has no labels for every window (the
            batch did not pass ``transforms.features.AssignWindowLabels``).
    """
    n = batch.n_windows
    source = batch.source
    extras = dict(source.extra)
    labels, label = _label_columns(batch)
    flat = pa.array(batch.features.reshape(-1), type=pa.float32())
    columns = {
        "clip_id": pa.array([source.clip_id] * n, pa.string()),
        "source_uri": pa.array([source.public_uri] * n, pa.string()),
        "archive_member": pa.array([source.archive_member] * n, pa.string()),
        "window_index": pa.array(np.arange(n, dtype=np.int32) + batch.first_window_index),
        "start_s": pa.array(batch.start_s, pa.float64()),
        "end_s": pa.array(batch.end_s, pa.float64()),
        "label": pa.array(label, pa.string()),
        "label_index": pa.array(
            np.asarray([label_map.get(name, -1) if name is not None else -1 for name in label], np.int32)
        ),
        "labels": labels,
        "strong": pa.array(np.full(n, source.strong, bool), pa.bool_()),
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


def _label_columns(batch: WindowBatch) -> tuple[pa.Array, list[str | None]]:
    """``(labels column, label per window)`` of a batch (see :func:`batch_to_table`)."""
    n, source = batch.n_windows, batch.source
    if not source.strong:
        return pa.nulls(n, _ARROW_TYPES["string_list"]), [source.label] * n
    if batch.labels is None or len(batch.labels) != n:
        got = "none" if batch.labels is None else len(batch.labels)
        raise ValueError(
            f"{source.clip_id}: strongly labelled batch of {n} windows carries labels for {got}; "
            "apply transforms.features.AssignWindowLabels before writing it"
        )
    # One label names the window as a weak label would; several (or none) leave it null, and
    # the labels column says which.
    label = [names[0] if len(names) == 1 else None for names in batch.labels]
    return pa.array([list(names) for names in batch.labels], _ARROW_TYPES["string_list"]), label


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
            key = tuple(value) if isinstance(value, list) else value
            entry = cache.get(key)
            if entry is None:
                entry = cache[key] = _scalar_entry(name, kind, value)
            entries.append(entry)
        per_column.append(entries)
    for row_entries in zip(*per_column, strict=True):
        yield tfexample.encode_entries(row_entries)


def _scalar_entry(name: str, kind: str, value) -> bytes:
    if value is None:
        return b""
    if kind == "string":
        feature = tfexample.bytes_feature([value.encode()])
    elif kind == "string_list":  # [] is written as an empty list: background, not unlabelled
        feature = tfexample.bytes_feature([v.encode() for v in value])
    elif kind in ("int32", "int64", "bool"):
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


def tfrecord_dataset(
    paths: str | Sequence[str],
    config: FeatureConfig,
    extra_columns: Sequence[str] = (),
    *,
    label_map: Mapping[str, int] | None = None,
):
    """``tf.data.Dataset`` of parsed windows (one dict of tensors per window).

    ``log_mel`` is reshaped to ``[n_mels, n_frames]`` (``embedding`` of an EmbeddingConfig's
    shards to ``[embedding_size]``); ``labels`` is a string tensor ``[n_labels]`` (empty for
    background and for weakly labelled windows; ``strong``, a bool, tells them apart), so batch
    with ``ragged_batch`` or drop it first. With ``label_map`` each window also gets
    ``multi_hot``: float32 ``[n_classes]`` targets by the rule of :func:`multi_hot`.

    Args:
        paths: One TFRecord shard or several.
        config: The shards' FeatureConfig or EmbeddingConfig.
        extra_columns: Manifest columns of the shards (``dataset.json``'s ``extra_columns``
            without the ``meta_`` prefix).
        label_map: Label name to class index (``dataset.json``'s ``label_map``), or ``None``.
    """
    import tensorflow as tf

    spec = tf_feature_spec(config, extra_columns)
    shape = list(config.feature_shape)
    column = feature_column_of(config)
    ragged = [name for name, feature in spec.items() if isinstance(feature, tf.io.VarLenFeature)]
    lookup = None
    if label_map is not None:
        names = list(label_map)
        n_classes = max(label_map.values(), default=-1) + 1
        lookup = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(names, tf.string), tf.constant([label_map[k] for k in names], tf.int64)
            ),
            default_value=-1,
        )

    def parse(record):
        example = tf.io.parse_single_example(record, spec)
        example[column] = tf.reshape(example[column], shape)
        for name in ragged:
            example[name] = tf.sparse.to_dense(example[name])
        example["strong"] = tf.cast(example["strong"], tf.bool)
        if lookup is not None:
            weak = tf.reshape(example["label"], [1])
            names = tf.cond(tf.size(example["labels"]) > 0, lambda: example["labels"], lambda: weak)
            ids = lookup.lookup(names)
            known = tf.reduce_all((ids >= 0) | tf.equal(names, ""))
            with tf.control_dependencies([tf.debugging.Assert(known, ["label not in label_map:", names])]):
                # one_hot of -1 (no weak label) is a row of zeros; a sum over no rows is zeros too.
                hot = tf.reduce_sum(tf.one_hot(ids, n_classes, dtype=tf.float32), axis=0)
            example["multi_hot"] = tf.minimum(hot, 1.0)
        return example

    files = [paths] if isinstance(paths, str) else list(paths)
    return tf.data.TFRecordDataset(files).map(parse)


def multi_hot(labels, label_map: Mapping[str, int], *, label=None) -> np.ndarray:
    """Training targets of windows for multi-label classifiers.

    Per row, in this order:

    - a non-empty ``labels`` list (a strongly labelled window with events): 1 for each of its
      labels (multi-hot);
    - else a ``label`` (a weakly labelled window: its clip label): one-hot of it;
    - else all zeros: a strongly labelled background window (``labels == []``) or an unlabelled
      window (``strong`` tells the two apart, where a trainer must).

    Args:
        labels: A window table (``pyarrow.Table``: its ``labels`` and ``label`` columns are used),
            or the ``labels`` column alone: an Arrow array, or a sequence with one entry per row,
            ``None`` or a sequence of names (``str``, or ``bytes`` as tf.data gives them).
        label_map: Label name to class index (``dataset.json``'s ``label_map``); classes are
            ``0 .. max(index)``.
        label: When ``labels`` is not a table: the ``label`` column (per row a name, bytes,
            ``None`` or ``""``), or ``None`` for no weak labels.

    Returns:
        float32 ``[n_windows, n_classes]`` of 0 and 1.

    Raises:
        ValueError: a name not in ``label_map`` (naming it), or ``label`` of another length.
    """
    if isinstance(labels, pa.Table):
        table = labels
        label = table.column("label").to_pylist() if "label" in table.column_names else None
        labels = table.column("labels").to_pylist() if "labels" in table.column_names else [None] * len(table)
    elif isinstance(labels, (pa.Array, pa.ChunkedArray)):
        labels = labels.to_pylist()
    rows = list(labels)
    if label is None:
        weak = [None] * len(rows)
    else:
        weak = list(label.to_pylist() if hasattr(label, "to_pylist") else label)
    if len(weak) != len(rows):
        raise ValueError(f"label has {len(weak)} rows but labels has {len(rows)}")
    n_classes = max(label_map.values(), default=-1) + 1
    out = np.zeros((len(rows), n_classes), np.float32)

    def index(name) -> int:
        text = name.decode() if isinstance(name, bytes) else str(name)
        try:
            return label_map[text]
        except KeyError:
            raise ValueError(f"label {text!r} is not in the label map {sorted(label_map)}") from None

    for row, (names, clip_label) in enumerate(zip(rows, weak, strict=True)):
        if names is not None and len(names):
            out[row, [index(name) for name in names]] = 1.0
        elif clip_label is not None and clip_label not in ("", b""):
            out[row, index(clip_label)] = 1.0
    return out
