"""``soundshard info``: features outputs, model folders and tag outputs described from their JSON."""

import json

import pandas as pd

from soundshard.pipelines import info, tag


def test_features_output(demo_features, capsys):
    assert info.run([str(demo_features)]) == 0
    text = capsys.readouterr().out
    dataset = json.loads((demo_features / "dataset.json").read_text())
    assert text.startswith(f"features         {demo_features}\n")
    assert "clips by label   chirp 8, click_train 8, hum 8, noise_burst 8" in text
    assert f"windows          {dataset['figures']['windows']}" in text
    assert "dead letters     decode_error 1, empty_file 1" in text
    assert f"shards           parquet {len(dataset['shards']['parquet'])}" in text
    assert info.run([str(demo_features), "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["kind"] == "features" and described["labels"] == sorted(dataset["label_map"])
    assert described["clips_by_fold"] == dataset["counts"]["clips_by_fold"]


def test_model_folder(demo_model, capsys):
    assert info.run([str(demo_model), "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    model = json.loads((demo_model / "model.json").read_text())
    metrics = json.loads((demo_model / "metrics.json").read_text())
    assert described["kind"] == "model" and described["architecture"] == "edgecnn"
    assert described["parameters"] == metrics["parameters"] > 0
    assert described["classes"] == model["label_names"]
    assert list(described["window_thresholds"].values()) == model["thresholds"]["window"]
    assert described["event_rules"] == model["postprocessing"]
    assert info.run([str(demo_model)]) == 0
    text = capsys.readouterr().out
    assert f"test             clip accuracy {metrics['clip_mean']['accuracy']:.3f} on 8 clips" in text
    assert "split            test fold 1, validation fold 2, trained on folds [3, 4]" in text


def test_tag_output(demo_features, demo_model, tmp_path, capsys):
    out = tmp_path / "tags"
    audio = demo_features.parent / "audio"
    assert tag.run(["--input", str(audio), "--model-dir", str(demo_model), "--output", str(out)]) == 0
    capsys.readouterr()
    assert info.run([str(out), "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    events = pd.read_parquet(out / "parquet" / "events")
    assert described["kind"] == "tags" and described["events"] == len(events) > 0
    assert described["events_by_label"] == events["label"].value_counts().to_dict()
    assert described["recordings_tagged"] == 32 and described["dead_letters"] == 2
    # outputs written before the summary counted events per label: counted from the table
    run = json.loads((out / "run.json").read_text())
    del run["figures"]["events_by_label"]
    (out / "run.json").write_text(json.dumps(run))
    assert info.describe(str(out))["events_by_label"] == described["events_by_label"]


def test_not_an_output_or_a_tampered_model(demo_model, tmp_path, capsys):
    assert info.run([str(tmp_path)]) == 2
    assert "holds no dataset.json, model.json or tag run.json" in capsys.readouterr().err
    copy = tmp_path / "model"
    copy.mkdir()
    model = json.loads((demo_model / "model.json").read_text())
    model["label_names"][0] = "something else"
    (copy / "model.json").write_text(json.dumps(model))
    (copy / "model.keras").write_bytes((demo_model / "model.keras").read_bytes())
    assert info.run([str(copy)]) == 2
    assert "soundshard info: error:" in capsys.readouterr().err
