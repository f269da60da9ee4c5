"""The window table schema, checked against golden copies so incompatible changes are deliberate."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from soundshard.schemas import fields
from soundshard.schemas.config import FeatureConfig
from soundshard.schemas.records import SourceItem, WindowBatch

GOLDEN = Path(__file__).parents[1] / "golden"


def tf_spec_description(spec) -> dict:
    def describe(f) -> dict:
        if not hasattr(f, "shape"):  # VarLenFeature: a variable number of values
            return {"dtype": f.dtype.name, "varlen": True}
        return {
            "dtype": f.dtype.name,
            "shape": list(f.shape),
            "default": f.default_value.decode() if isinstance(f.default_value, bytes) else f.default_value,
        }

    return {name: describe(f) for name, f in spec.items()}


def test_arrow_schema_matches_golden():
    schema = fields.arrow_schema(FeatureConfig(), extra_columns=("src_file",))
    assert schema.to_string(show_schema_metadata=True) == (GOLDEN / "window_schema.arrow.txt").read_text()


def test_tf_spec_matches_golden():
    spec = fields.tf_feature_spec(FeatureConfig(), extra_columns=("src_file",))
    golden = json.loads((GOLDEN / "window_spec.tf.json").read_text())
    assert tf_spec_description(spec) == golden


def make_batch(n: int = 3) -> WindowBatch:
    config = FeatureConfig()
    rng = np.random.default_rng(0)
    features = rng.standard_normal((n, *config.feature_shape)).astype(np.float32)
    starts = np.arange(n) * config.window_hop_s
    source = SourceItem("/x/dog/a.wav", "dog/a", "dog", 3, None, (("src_file", "111"),), 10)
    return WindowBatch(source, features, starts, starts + config.window_s, first_window_index=0)


def test_batch_to_table_and_back():
    config = FeatureConfig()
    batch = make_batch()
    table = fields.batch_to_table(
        batch, config=config, label_map={"cat": 0, "dog": 1}, extra_columns=("src_file",)
    )
    assert table.schema.equals(fields.arrow_schema(config, ("src_file",)), check_metadata=True)
    assert table.column("label_index").to_pylist() == [1, 1, 1]
    assert table.column("window_index").to_pylist() == [0, 1, 2]
    assert table.column("meta_src_file").to_pylist() == ["111"] * 3
    assert table.column("split").to_pylist() == [None] * 3
    flat = table.column(fields.FEATURE_COLUMN).combine_chunks().values.to_numpy()
    np.testing.assert_array_equal(flat.reshape(3, 60, 41), batch.features)


def test_examples_parse_with_tensorflow():
    tf = pytest.importorskip("tensorflow")
    config = FeatureConfig()
    batch = make_batch()
    table = fields.batch_to_table(batch, config=config, label_map={"dog": 0}, extra_columns=("src_file",))
    records = list(fields.table_to_examples(table))
    parsed = tf.io.parse_example(tf.constant(records), fields.tf_feature_spec(config, ("src_file",)))
    np.testing.assert_array_equal(parsed["log_mel"].numpy().reshape(3, 60, 41), batch.features)
    assert parsed["clip_id"].numpy().tolist() == [b"dog/a"] * 3
    assert parsed["fold"].numpy().tolist() == [3, 3, 3]
    assert parsed["split"].numpy().tolist() == [b""] * 3  # null -> default
    assert parsed["label_index"].numpy().tolist() == [0, 0, 0]
    np.testing.assert_allclose(parsed["start_s"].numpy(), batch.start_s, rtol=1e-6)
    example = tf.train.Example.FromString(records[1])
    assert example.features.feature["window_index"].int64_list.value == [1]


def test_feature_shape_metadata_required():
    with pytest.raises(ValueError, match="not a soundshard shard"):
        fields.feature_shape_of(pa.schema([pa.field("a", pa.int32())]))
