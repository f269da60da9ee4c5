"""soundshard embed: TFLite batch layouts and threads, and the op check of untrusted SavedModels.

Every model is built here (``embedding_fixtures``): tiny TFLite files with a fixed batch of 1 or
4 or a dynamic batch, one whose rows depend on the rest of the batch, ordinary Keras exports, and
SavedModels that read or write a file. The file-touching SavedModels are only ever refused, never
loaded.
"""

import concurrent.futures
import dataclasses
import json
import logging
import re
import shutil
import threading

import numpy as np
import pytest

from soundshard.pipelines import embed
from soundshard.schemas import fields
from soundshard.schemas.embedding import EmbeddingConfig
from soundshard.schemas.errors import ConfigError
from soundshard.transforms.audio import framing
from soundshard.transforms.audio.decode import decode_audio
from soundshard.transforms.features import embeddings

from .. import embedding_fixtures as fx
from ..helpers import tone, write_audio

TINY = {"sample_rate_hz": 16000, "window_s": 1.0, "hop_s": 0.5, "embedding_size": fx.EMBEDDING_SIZE}
TINY_FLAGS = ["--sample-rate-hz", "16000", "--window-s", "1", "--hop-s", "0.5", "--embedding-size", "5"]


# -- TFLite: batch layouts -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tflite_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tflite")
    return {
        "dynamic": fx.make_tflite(root / "dynamic.tflite", window_samples=16000),
        "batch1": fx.make_tflite(root / "batch1.tflite", window_samples=16000, batch=1),
        "batch4": fx.make_tflite(root / "batch4.tflite", window_samples=16000, batch=4),
        "mixing": fx.make_batch_mixing_tflite(root / "mixing.tflite", window_samples=16000),
        "waveform": fx.make_waveform_tflite(root / "waveform.tflite", frame_samples=8000),
    }


def _load_tflite(path) -> embeddings.TFLiteEmbedder:
    return embeddings.load_embedding_model(EmbeddingConfig(model="tflite", model_uri=str(path), **TINY))


def test_tflite_fixed_and_dynamic_batches_give_the_reference_values(tflite_models):
    windows = np.random.default_rng(0).standard_normal((7, 16000)).astype(np.float32)
    expected = fx.tiny_embedding(windows)
    # dynamic: whole batches; fixed: the model's own batch (4: filled up with silence);
    # "mixing" says its batch is dynamic, but the trial batch shows rows that depend on each other
    for name, per_call in (("dynamic", None), ("batch1", 1), ("batch4", 4), ("mixing", 1)):
        model = _load_tflite(tflite_models[name])
        assert model.windows_per_call == per_call, name
        for n in (1, 3, 4, 7):
            np.testing.assert_allclose(model.embed(windows[:n]), expected[:n], rtol=1e-5, atol=1e-5)
        assert model.embed(windows[:0]).shape == (0, fx.EMBEDDING_SIZE)


def test_a_tflite_model_of_one_waveform_is_called_per_window(tflite_models, monkeypatch):
    windows = np.random.default_rng(5).standard_normal((3, 16000)).astype(np.float32)
    model = _load_tflite(tflite_models["waveform"])  # input [-1]: resized to [16000] after a trial
    assert model.windows_per_call == 1
    halves = np.stack([fx.tiny_embedding(w.reshape(2, 8000)).mean(axis=0) for w in windows])
    np.testing.assert_allclose(model.embed(windows), halves, rtol=1e-5, atol=1e-5)
    # a model that cannot even take one window without a resize that kills the process: refused
    monkeypatch.setattr(
        embeddings, "_TFLITE_PROBE_SCRIPT", "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)"
    )
    monkeypatch.setattr(embeddings, "_TFLITE_PROBES", {})
    with pytest.raises(
        ConfigError, match=r"cannot take windows of 16000 samples: resized to \[16000\], .*SIGSEGV"
    ):
        _load_tflite(tflite_models["waveform"])


def test_a_crashing_trial_batch_leaves_the_model_at_its_own_batch(tflite_models, monkeypatch, caplog):
    # Resizing some models kills the process (a segmentation fault): the trial runs in a child
    # process, so here the child "crashes" and the model is called one window at a time.
    monkeypatch.setattr(
        embeddings, "_TFLITE_PROBE_SCRIPT", "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)"
    )
    monkeypatch.setattr(embeddings, "_TFLITE_PROBES", {})
    windows = np.random.default_rng(1).standard_normal((3, 16000)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger=embeddings.__name__):
        model = _load_tflite(tflite_models["dynamic"])
    assert model.windows_per_call == 1
    assert "SIGSEGV" in caplog.text and "one window per call" in caplog.text
    np.testing.assert_allclose(model.embed(windows), fx.tiny_embedding(windows), rtol=1e-5, atol=1e-5)


def test_tflite_input_that_cannot_take_the_window_is_a_config_error(tflite_models):
    config = EmbeddingConfig(
        model="tflite", model_uri=str(tflite_models["batch1"]), **{**TINY, "window_s": 0.5}
    )
    with pytest.raises(ConfigError, match=r"input \[1, 16000\].*windows of 8000 samples"):
        embeddings.load_embedding_model(config)


def _same_on_many_threads(model: embeddings.EmbeddingModel, *, n_threads: int = 6) -> None:
    """Calls from several threads at once give the single-threaded values."""
    rng = np.random.default_rng(2)
    batches = [rng.standard_normal((1 + k % 5, 16000)).astype(np.float32) for k in range(12)]
    expected = [model.embed(b) for b in batches]
    start = threading.Barrier(n_threads)

    def work(offset):
        start.wait()
        return [(k, model.embed(batches[k])) for k in (np.arange(3 * len(batches)) + offset) % len(batches)]

    with concurrent.futures.ThreadPoolExecutor(n_threads) as pool:
        results = [r for rows in pool.map(work, range(n_threads)) for r in rows]
    assert len(results) == n_threads * 3 * len(batches)
    for k, got in results:
        np.testing.assert_allclose(got, expected[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["batch1", "dynamic", "batch4"])
def test_one_loaded_tflite_model_is_safe_on_many_threads(tflite_models, name):
    """RunInference shares one loaded model between a process's threads (one interpreter each)."""
    _same_on_many_threads(_load_tflite(tflite_models[name]))


def test_embed_runs_a_fixed_batch_tflite_model_on_two_threads(tflite_models, tmp_path):
    rng = np.random.default_rng(3)
    for k in range(4):
        y = tone(sample_rate_hz=16000, duration_s=12.0) + 0.1 * rng.standard_normal(12 * 16000)
        write_audio(tmp_path / "in" / f"rec{k}.wav", y.astype(np.float32), 16000, "FLOAT")
    out = tmp_path / "out"
    argv = [
        "--input",
        tmp_path / "in",
        "--output",
        out,
        "--embedding-model",
        f"tflite:{tflite_models['batch1']}",
    ]
    argv += [*TINY_FLAGS, "--unit_s", "3", "--format", "parquet", "--direct_num_workers", "2"]
    assert embed.run([str(a) for a in argv]) == 0
    dataset = json.loads((out / "dataset.json").read_text())
    fig = dataset["figures"]
    assert (fig["files_processed"], fig["dead_letters"], fig["windows"]) == (4, 0, 4 * 23)
    table, values = fields.read_parquet_windows(sorted(str(p) for p in (out / "parquet").glob("*.parquet")))
    grid = framing.FrameGrid.from_config(EmbeddingConfig.from_dict(dataset["feature_config"]))
    for k in range(4):
        rows = [i for i, c in enumerate(table.column("clip_id").to_pylist()) if c == f"rec{k}"]
        order = np.argsort(table.column("window_index").to_numpy()[rows])
        decoded = decode_audio(str(tmp_path / "in" / f"rec{k}.wav"), sample_rate_hz=16000).samples
        expected = fx.tiny_embedding(grid.frames(decoded))
        np.testing.assert_allclose(values[rows][order], expected, rtol=1e-4, atol=1e-4)


# -- SavedModels: the op check -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved_models")
    secret = root / "secret.txt"
    secret.write_text("not for models")
    written = root / "written.txt"
    keras_folder, keras_model = fx.make_keras_saved_model(root / "keras", window_samples=16000)
    return {
        "reader": fx.make_file_touching_saved_model(root / "reader", window_samples=16000, read=str(secret)),
        "writer": fx.make_file_touching_saved_model(
            root / "writer", window_samples=16000, write=str(written)
        ),
        "written": written,
        "tiny": fx.make_saved_model(root / "tiny", window_samples=16000),
        "frames": fx.make_waveform_saved_model(root / "frames", frame_samples=8000),
        "keras": keras_folder,
        "keras_model": keras_model,
    }


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    folder = tmp_path_factory.mktemp("embed_audio")
    write_audio(folder / "a.wav", tone(sample_rate_hz=16000, duration_s=2.0), 16000)
    return folder


@pytest.mark.parametrize("kind, op", [("reader", "ReadFile"), ("writer", "WriteFile")])
def test_embed_refuses_saved_models_that_touch_files(saved_models, audio, tmp_path, capsys, kind, op):
    out = tmp_path / "out"
    argv = [
        "--input",
        audio,
        "--output",
        out,
        "--embedding-model",
        f"saved_model:{saved_models[kind]}",
        *TINY_FLAGS,
    ]
    assert embed.run([str(a) for a in [*argv, "--embedding-output", "embedding"]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # one line
    assert re.search(rf"\b{op}\b[^()]*\(in function __inference_serve_\d+\)", err), err
    assert "--trust-model-code" in err
    assert not out.exists()
    assert not saved_models["written"].exists()


def test_workers_check_the_ops_again_before_loading(saved_models):
    config = EmbeddingConfig(model="saved_model", model_uri=str(saved_models["writer"]), output=0, **TINY)
    with pytest.raises(ConfigError, match=r"WriteFile \(in function __inference_serve_\d+\)"):
        embeddings.load_embedding_model(config)
    assert not saved_models["written"].exists()


@pytest.mark.parametrize("kind, output", [("tiny", "embedding"), ("frames", 1)])
def test_one_loaded_saved_model_is_safe_on_many_threads(saved_models, kind, output):
    config = EmbeddingConfig(model="saved_model", model_uri=str(saved_models[kind]), output=output, **TINY)
    _same_on_many_threads(embeddings.load_embedding_model(config))


def _edited(folder, tmp_path, edit):
    """A copy of the SavedModel ``folder`` whose saved_model.pb ``edit(proto)`` changed."""
    from tensorflow.core.protobuf import saved_model_pb2

    copy = tmp_path / f"edited{len(list(tmp_path.iterdir()))}"
    shutil.copytree(folder, copy)
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((copy / "saved_model.pb").read_bytes())
    edit(proto.meta_graphs[0])
    (copy / "saved_model.pb").write_bytes(proto.SerializeToString())
    return copy


def _function(meta_graph, prefix: str):
    (function,) = [f for f in meta_graph.graph_def.library.function if f.signature.name.startswith(prefix)]
    return function


def test_checkpoint_ops_are_allowed_only_in_the_saver_functions(saved_models, tmp_path):
    embeddings.check_saved_model_ops(str(saved_models["tiny"]))  # SaveV2 & co. in __traced_save: fine

    def save_in_serving(meta_graph):
        node = _function(meta_graph, "__inference_serve_").node_def.add()
        node.name, node.op = "sneaky_save", "SaveV2"

    def call_saver_from_serving(meta_graph):
        save = _function(meta_graph, "__inference__traced_save_").signature.name
        node = _function(meta_graph, "__inference_serve_").node_def.add()
        node.name, node.op = "sneaky_call", "StatefulPartitionedCall"
        node.attr["f"].func.name = save

    def write_in_saver(meta_graph):
        node = _function(meta_graph, "__inference__traced_restore_").node_def.add()
        node.name, node.op = "sneaky_write", "WriteFile"

    cases = [
        (save_in_serving, r"SaveV2 \(in function __inference_serve_\d+\)"),
        (call_saver_from_serving, r"MergeV2Checkpoints, SaveV2, ShardedFilename.*__inference__traced_save_"),
        (write_in_saver, r"WriteFile \(in function __inference__traced_restore_\d+\)"),
    ]
    for edit, message in cases:
        with pytest.raises(ConfigError, match=message):
            embeddings.check_saved_model_ops(str(_edited(saved_models["tiny"], tmp_path, edit)))


def test_ordinary_saved_models_pass_the_op_check(saved_models, tmp_path):
    import keras
    import tensorflow as tf

    from soundshard.transforms.models.architectures import build_model

    folders = [saved_models["tiny"], saved_models["frames"]]
    for name, shape in (("edgecnn", (60, 41)), ("sbcnn", (60, 41)), ("mlp", (512,))):
        model = build_model(name, input_shape=shape, n_classes=3, normalization=(0.5, 2.0))
        model.export(str(tmp_path / name), verbose=False)  # as `soundshard train` writes it
        folders.append(tmp_path / name)
    lstm = keras.Sequential(
        [
            keras.Input((50, 8)),
            keras.layers.LayerNormalization(),
            keras.layers.Bidirectional(keras.layers.LSTM(4, return_sequences=True)),
            keras.layers.GRU(4),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    tf.saved_model.save(lstm, str(tmp_path / "lstm"))
    folders.append(tmp_path / "lstm")
    for folder in folders:
        embeddings.check_saved_model_ops(str(folder))
    # and the Keras export runs as an embedding model, with the values of the Keras model
    config = EmbeddingConfig(model="saved_model", model_uri=str(saved_models["keras"]), **TINY)
    model = embeddings.load_embedding_model(embeddings.check_model(config))
    windows = np.random.default_rng(4).standard_normal((3, 16000)).astype(np.float32)
    expected = saved_models["keras_model"].predict_on_batch(windows)
    np.testing.assert_allclose(model.embed(windows), expected, rtol=1e-4, atol=1e-5)


def test_trust_model_code_skips_the_check(saved_models, audio, tmp_path, monkeypatch):
    help_text = embed.make_parser().format_help()
    assert "--trust-model-code" in help_text and "SavedModels are programs" in help_text

    def refuse(uri):
        raise AssertionError("the op check ran")

    monkeypatch.setattr(embeddings, "check_saved_model_ops", refuse)
    out = tmp_path / "out"
    argv = [
        "--input",
        audio,
        "--output",
        out,
        "--embedding-model",
        f"saved_model:{saved_models['keras']}",
        *TINY_FLAGS,
    ]
    assert embed.run([str(a) for a in [*argv, "--trust-model-code", "--format", "parquet"]]) == 0
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["figures"]["windows"] == 3 and dataset["feature_config"]["trust_model_code"] is True
    config = EmbeddingConfig(model="saved_model", model_uri="m", **TINY)
    # not a property of the numbers: the fingerprint (and the config JSON when off) stay as they were
    assert config.replace(trust_model_code=True).fingerprint == config.fingerprint
    assert "trust_model_code" not in config.to_dict()
    with pytest.raises(ConfigError, match="trust_model_code=True applies to saved_model only"):
        EmbeddingConfig(model="tflite", model_uri="m", trust_model_code=True, **TINY)


def test_the_op_lists_are_deliberate():
    from tensorflow.core.framework import op_def_pb2
    from tensorflow.python.client import pywrap_tf_session

    registered = op_def_pb2.OpList()
    registered.ParseFromString(pywrap_tf_session.TF_GetBuffer(pywrap_tf_session.TF_GetAllOpList()))
    names = {op.name for op in registered.op}
    allowed = embeddings.SAVED_MODEL_INFERENCE_OPS | embeddings.SAVED_MODEL_CHECKPOINT_OPS
    assert sorted(allowed - names) == []  # no typos: every name is a TensorFlow op
    assert not embeddings.SAVED_MODEL_INFERENCE_OPS & embeddings.SAVED_MODEL_CHECKPOINT_OPS
    assert not allowed & embeddings.SAVED_MODEL_FORBIDDEN_OPS
    for op in (
        "ReadFile",
        "WriteFile",
        "MatchingFiles",
        "PyFunc",
        "EagerPyFunc",
        "PrintV2",
        "ImmutableConst",
    ):
        assert op in embeddings.SAVED_MODEL_FORBIDDEN_OPS
    # no op that reads or writes files, runs Python, prints, talks to other processes or reads
    # datasets is allowed anywhere, whatever its name; the checkpoint ops are these and no more
    io_words = ("File", "Reader", "Dataset", "Summary", "Py", "Print", "Rpc", "Send", "Recv", "Iterator")
    inference = embeddings.SAVED_MODEL_INFERENCE_OPS
    assert sorted(op for op in inference if any(w in op for w in io_words)) == []
    assert embeddings.SAVED_MODEL_CHECKPOINT_OPS == {
        "SaveV2", "RestoreV2", "MergeV2Checkpoints", "ShardedFilename", "ShardedFilespec", "Save",
        "SaveSlices", "Restore", "RestoreSlice", "StringJoin", "StaticRegexFullMatch", "DisableCopyOnRead",
    }  # fmt: skip


def test_an_intermediate_tensor_of_a_tflite_model_is_the_embedding(tmp_path):
    """A BirdNET-style model: its output is class scores, the embedding the tensor before them,
    named with --embedding-output; values equal the reference at any batch size."""
    path = fx.make_scoring_tflite(tmp_path / "scores.tflite", window_samples=16000)
    windows = np.random.default_rng(1).standard_normal((5, 16000)).astype(np.float32)
    config = EmbeddingConfig(model="tflite", model_uri=str(path), output="concat", **TINY)
    model = embeddings.load_embedding_model(config)
    for n in (1, 2, 5):
        np.testing.assert_allclose(
            model.embed(windows[:n]), fx.tiny_embedding(windows[:n]), rtol=1e-5, atol=1e-5
        )
    # the output itself is the scores, not the embedding
    scores = EmbeddingConfig(model="tflite", model_uri=str(path), **{**TINY, "embedding_size": 3})
    assert embeddings.load_embedding_model(scores).embed(windows[:2]).shape == (2, 3)
    with pytest.raises(ConfigError) as info:
        embeddings.load_embedding_model(dataclasses.replace(config, output="no_such_tensor"))
    assert "is neither an output nor a tensor" in str(info.value) and "concat [1, 5]" in str(info.value)
