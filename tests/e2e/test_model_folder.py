"""Model folders are self-consistent or refused (``transforms/models/architectures.py``).

``soundshard train`` seals ``model.json`` with a digest over all its fields and the model file's
bytes; ``tag``, ``evaluate`` and ``compile-edge`` verify it, and load the model in Keras safe mode,
on the launcher before any audio is read, and exit 2 naming what differs. Each test edits a copy of
the session's demo model (``tests/conftest.py``).
"""

from __future__ import annotations

import hashlib
import json

import fsspec
import pytest

from soundshard.pipelines import compile_edge, features, tag, train
from soundshard.schemas.errors import ConfigError
from soundshard.transforms.models import architectures as models
from soundshard.transforms.tagging import classify as tagging

from ..helpers import copy_model_folder, reseal_model_folder, tone, write_audio


@pytest.fixture
def model(demo_model, tmp_path):
    """A copy of the trained demo model to edit."""
    return copy_model_folder(demo_model, tmp_path / "model")


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    """Two short recordings to tag."""
    root = tmp_path_factory.mktemp("recordings")
    write_audio(root / "a.wav", tone(duration_s=2.0, freq_hz=800.0, seed=1), 22050)
    write_audio(root / "b.wav", tone(duration_s=2.0, freq_hz=2000.0, seed=2), 22050)
    return root


def description_of(folder) -> dict:
    return json.loads((folder / "model.json").read_text())


def edit(folder, change) -> None:
    description = description_of(folder)
    change(description)
    (folder / "model.json").write_text(json.dumps(description, indent=2))


def run_tag(recordings, model, out) -> int:
    return tag.run([str(a) for a in ("--input", recordings, "--model-dir", model, "--output", out)])


@pytest.fixture
def no_audio_read(monkeypatch):
    """Fails the test if a run gets as far as listing its sources."""

    def refuse(*args, **kwargs):
        raise AssertionError("the sources were listed: the model was not refused first")

    monkeypatch.setattr(features, "take_sources", refuse)


# -- what training writes ---------------------------------------------------------------------------


def test_trained_folder_is_sealed(demo_model):
    description = description_of(demo_model)
    sealed = description["integrity"]
    model_bytes = (demo_model / "model.keras").read_bytes()
    assert sealed["model_file_sha256"] == hashlib.sha256(model_bytes).hexdigest()
    covered = {k: v for k, v in description.items() if k != "integrity"}
    canonical = json.dumps(
        {"model_file_sha256": sealed["model_file_sha256"], "model_json": covered},
        sort_keys=True,
        separators=(",", ":"),
    )
    assert sealed["digest"] == hashlib.sha256(canonical.encode()).hexdigest()
    assert {"label_names", "label_map", "feature_config", "feature_fingerprint", "thresholds"} <= set(
        sealed["fields"]
    )
    assert models.read_description(str(demo_model)) == description


def test_untouched_copy_still_tags(model, recordings, tmp_path):
    out = tmp_path / "tags"
    assert run_tag(recordings, model, out) == 0
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["figures"]["files_processed"] == 2
    assert manifest["model"]["label_names"] == description_of(model)["label_names"]


def test_untouched_remote_copy_loads(demo_model):
    """Remote folders are read through fsspec (here its in-memory filesystem)."""
    fs = fsspec.filesystem("memory")
    for name in ("model.json", "model.keras"):
        fs.pipe(f"/sealed/{name}", (demo_model / name).read_bytes())
    classifier = tagging.load_classifier_from("memory://sealed")
    assert classifier.n_classes == len(description_of(demo_model)["label_names"])
    fs.pipe("/sealed/model.keras", (demo_model / "model.keras").read_bytes()[:-100])
    with pytest.raises(ConfigError, match="model.keras has SHA-256"):
        tagging.load_classifier_from("memory://sealed")
    fs.rm("/sealed", recursive=True)


# -- edited metadata --------------------------------------------------------------------------------


def test_permuted_label_names_are_refused_by_tag(model, recordings, tmp_path, capsys, no_audio_read):
    edit(model, lambda d: d.update(label_names=d["label_names"][1:] + d["label_names"][:1]))
    out = tmp_path / "tags"
    assert run_tag(recordings, model, out) == 2
    err = capsys.readouterr().err
    assert "model.json edited: fields label_names changed since training" in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_permuted_label_names_are_refused_by_evaluate_and_compile_edge(
    model, demo_features, tmp_path, capsys
):
    edit(model, lambda d: d.update(label_names=list(reversed(d["label_names"]))))
    argv = ["--model-dir", str(model), "--features", str(demo_features)]
    assert train.run_evaluate([*argv, "--test-fold", "1"]) == 2
    assert "fields label_names changed" in capsys.readouterr().err
    out = tmp_path / "edge"
    assert compile_edge.run([*argv, "--target", "cortex-m4-256k", "--output", str(out), "--quiet"]) == 2
    assert "fields label_names changed" in capsys.readouterr().err
    assert not out.exists()


def test_every_edited_field_is_named(model):
    def change(d):
        d["thresholds"] = dict.fromkeys(d["label_names"], 0.01)
        d["label_map"] = {k: len(d["label_map"]) - 1 - v for k, v in d["label_map"].items()}
        d["comment"] = "added"
        del d["data"]

    edit(model, change)
    with pytest.raises(ConfigError) as caught:
        models.read_description(str(model))
    message = str(caught.value)
    assert "fields label_map, thresholds changed; fields comment added; fields data removed" in message


def test_a_folder_without_digest_is_refused(model):
    edit(model, lambda d: d.pop("integrity"))
    with pytest.raises(ConfigError, match="no integrity digest .* retrain it with `soundshard train`"):
        models.read_description(str(model))


def test_an_edited_digest_is_refused(model):
    edit(model, lambda d: d["integrity"].update(digest="0" * 64))
    with pytest.raises(ConfigError, match="integrity digest does not match its content"):
        models.read_description(str(model))


# -- the model file ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "../outside.keras",
        "/tmp/model.keras",
        "gs://bucket/model.keras",
        "https://example.com/model.keras",
        "sub/model.keras",
        "..",
        "model.h5",
        "",
        None,
    ],
)
def test_model_file_must_be_a_plain_name_in_the_folder(model, name):
    edit(model, lambda d: d.update(model_file=name))
    with pytest.raises(ConfigError, match="must be a plain .keras file name inside the model folder"):
        models.read_description(str(model))


def test_model_file_outside_the_folder_is_refused_by_tag(model, recordings, tmp_path, capsys, no_audio_read):
    (tmp_path / "outside.keras").write_bytes((model / "model.keras").read_bytes())
    edit(model, lambda d: d.update(model_file="../outside.keras"))
    reseal_model_folder(model)  # even with a digest that matches, the name alone is refused
    out = tmp_path / "tags"
    assert run_tag(recordings, model, out) == 2
    assert "model_file '../outside.keras'" in capsys.readouterr().err
    assert not out.exists()


def test_truncated_model_file_is_refused_before_audio(model, recordings, tmp_path, capsys, no_audio_read):
    data = (model / "model.keras").read_bytes()
    (model / "model.keras").write_bytes(data[: len(data) // 2])
    out = tmp_path / "tags"
    assert run_tag(recordings, model, out) == 2
    err = capsys.readouterr().err
    assert f"model.keras has SHA-256 {hashlib.sha256(data[: len(data) // 2]).hexdigest()}" in err
    assert not out.exists()
    # sealed again, the digest passes: the trial load on the launcher still refuses the file
    reseal_model_folder(model)
    assert run_tag(recordings, model, out) == 2
    assert "model.keras cannot be loaded in Keras safe mode" in capsys.readouterr().err
    assert not out.exists()


def test_unsafe_model_file_is_refused(model, recordings, demo_features, tmp_path, capsys, no_audio_read):
    import keras

    inputs = keras.Input((60, 41), name="features")
    x = keras.layers.Lambda(lambda t: t * 2.0)(inputs)  # code in the file: safe mode refuses it
    outputs = keras.layers.Softmax()(keras.layers.Dense(4)(keras.layers.Flatten()(x)))
    keras.Model(inputs, outputs).save(model / "model.keras")
    reseal_model_folder(model)
    out = tmp_path / "tags"
    assert run_tag(recordings, model, out) == 2
    err = capsys.readouterr().err
    assert "model.keras cannot be loaded in Keras safe mode" in err and "Lambda" in err
    assert not out.exists()
    assert (
        train.run_evaluate(["--model-dir", str(model), "--features", str(demo_features), "--test-fold", "1"])
        == 2
    )
    assert "cannot be loaded in Keras safe mode" in capsys.readouterr().err


def test_a_model_that_does_not_fit_its_labels_is_refused(model):
    import keras

    inputs = keras.Input((60, 41), name="features")
    outputs = keras.layers.Softmax()(keras.layers.Dense(3)(keras.layers.Flatten()(inputs)))
    keras.Model(inputs, outputs).save(model / "model.keras")
    reseal_model_folder(model)
    with pytest.raises(ConfigError, match="gives 3 scores per window for 4 labels"):
        models.load_classifier(str(model))
