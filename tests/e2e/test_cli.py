"""The installed ``soundshard`` command, run as a user would."""

import argparse
import dataclasses
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from soundshard.pipelines import cli, features
from soundshard.schemas.config import FeatureConfig, attribute_docs


def soundshard(*args, cwd):
    exe = Path(sys.executable).with_name("soundshard")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "soundshard.pipelines.cli"]
    return subprocess.run(
        [*command, *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


@pytest.mark.slow
def test_demo_runs_with_no_arguments(tmp_path):
    result = soundshard("demo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # the terminal shows soundshard's lines only: no start-up chatter of TensorFlow, absl, CUDA
    # probes, LiteRT or Beam (native libraries' stderr goes to a log file, removed on success)
    chatter = ("absl", "E0000", "I0000", "W0000", "cuda", "oneDNN", "XNNPACK delegate", "WARNING:", "INFO:")
    for line in (result.stdout + result.stderr).splitlines():
        assert not any(word.lower() in line.lower() for word in chatter), line
    assert result.stderr.splitlines() == [
        line for line in result.stderr.splitlines() if line.startswith(("[features]", "[tag]"))
    ]
    assert "inputs           34  processed 32  dead letters 2  (all accounted for: True)" in result.stdout
    assert "dead letters     decode_error 1, empty_file 1" in result.stdout
    dataset = json.loads((tmp_path / "soundshard-demo" / "features" / "dataset.json").read_text())
    assert dataset["counts"]["clips_by_label"] == {"chirp": 8, "click_train": 8, "hum": 8, "noise_burst": 8}
    assert dataset["figures"]["windows"] == 192
    # the demo trains the edge-sized CNN and reports its held-out accuracy
    metrics = json.loads((tmp_path / "soundshard-demo" / "model" / "metrics.json").read_text())
    assert metrics["clip_mean"]["n"] == 8 and metrics["clip_mean"]["accuracy"] >= 0.75
    assert f"clip accuracy (mean) {metrics['clip_mean']['accuracy']:.3f}" in result.stdout
    # then tags a 40 s recording (in 10 s units) and prints its events
    demo = tmp_path / "soundshard-demo"
    tags = json.loads((demo / "tags" / "run.json").read_text())
    assert tags["figures"]["files_processed"] == 1 and tags["figures"]["work_units"] == 5
    assert tags["figures"]["events"] >= 4 and "truth:  chirp 0-6 s; hum 10-20 s" in result.stdout
    track = (demo / "tags" / "audacity" / "20261124_005945.txt").read_text().splitlines()
    assert len(track) == tags["figures"]["events"]
    # and ends with a verified int8 artifact that fits its target
    edge = json.loads((demo / "edge" / "manifest.json").read_text())
    assert edge["target"]["name"] == "cortex-m4-256k"
    assert (demo / "edge" / "model_int8.tflite").stat().st_size == edge["model_bytes"]
    assert "fits" in result.stdout and "artifact:" in result.stdout
    # same seed, same audio: a second run gives the same feature shards
    first = sorted((tmp_path / "soundshard-demo" / "features" / "parquet").glob("*.parquet"))
    before = [p.read_bytes() for p in first]
    assert soundshard("demo", "--no-train", cwd=tmp_path).returncode == 0
    assert [p.read_bytes() for p in first] == before


def test_usage_and_unknown_command(capsys):
    assert cli.main([]) == 2
    assert "usage: soundshard" in capsys.readouterr().out
    assert cli.main(["--help"]) == 0
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"soundshard {importlib.metadata.version('soundshard')}\n"


def test_misspelt_commands_and_options_get_the_closest_spelling(capsys, tmp_path):
    assert cli.main(["trian", "--features", "x"]) == 2
    assert "unknown command 'trian' (did you mean 'train'?)" in capsys.readouterr().err
    assert cli.main(["train", "--features", "x", "--output", str(tmp_path / "m"), "--epoch", "5"]) == 2
    assert capsys.readouterr().err.strip() == (
        "soundshard train: error: unrecognized option --epoch; did you mean --epochs?"
    )
    # pipeline commands pass Beam's flags through: those are known, a typo of either is not
    argv = ["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--runner", "DirectRunner"]
    assert cli.main(["tag", *argv, "--model-dir", "m", "--unit-sec", "60"]) == 2
    assert "unrecognized option --unit-sec; did you mean --unit-s?" in capsys.readouterr().err
    assert cli.main(["features", *argv, "--direct_num_workerz=2"]) == 2
    assert "did you mean --direct_num_workers?" in capsys.readouterr().err
    assert cli.main(["features", *argv, "--frobnicate"]) == 2
    assert "unrecognized option --frobnicate (see soundshard features --help)" in capsys.readouterr().err
    assert cli.unknown_option("features", [*argv, "--direct_num_workers=2", "--n-mels", "40"]) is None


def test_feature_flags_say_what_they_set_and_their_default():
    parser = argparse.ArgumentParser()
    features.add_feature_flags(parser)
    actions = {a.dest: a for a in parser._actions}
    docs = attribute_docs(FeatureConfig)
    assert set(docs) == {f.name for f in dataclasses.fields(FeatureConfig)}  # every field documented
    assert actions["feature__n_mels"].help == "Number of mel bands. Default: 60."
    assert actions["feature__fmax_hz"].help.endswith("Default: none.")
    assert "clamped at max - top_db per window" in actions["feature__top_db"].help  # continuation line
    assert actions["feature__sample_rate_hz"].option_strings == ["--sample-rate-hz", "--sample_rate_hz"]
    args = parser.parse_args(["--n-mels", "40", "--top_db", "60"])
    assert features.feature_config_from_args(argparse.Namespace(config=None, **vars(args))).n_mels == 40


def test_train_and_evaluate_help_load_no_tensorflow(tmp_path):
    # help and argument errors print at once, with no library start-up lines before them
    for command in ("train", "evaluate"):
        done = soundshard(command, "--help", cwd=tmp_path)
        assert done.returncode == 0 and done.stdout.startswith(f"usage: soundshard {command}")
        assert done.stderr == ""
    done = soundshard("train", "--features", "x", cwd=tmp_path)  # no --output
    assert done.returncode == 2 and done.stderr.startswith("usage: soundshard train")
    assert "required: --output" in done.stderr
    check = "import sys, soundshard.pipelines.train; print(sorted({'keras', 'tensorflow'} & {*sys.modules}))"
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert loaded.stdout.strip() == "[]"


def test_pipeline_commands_help_without_beam():
    # features, embed and tag answer --help from parsers built without Beam; the help is that of
    # the parser each command runs with
    script = (
        "import contextlib, io, sys\n"
        "from soundshard.pipelines import cli\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    code = cli.main([sys.argv[1], '--runner', 'DirectRunner', '--help'])\n"
        "print(code, 'apache_beam' in sys.modules, out.getvalue().splitlines()[0])\n"
    )
    for command in ("features", "embed", "tag"):
        done = subprocess.run(
            [sys.executable, "-c", script, command], capture_output=True, text=True, timeout=120
        )
        assert done.stdout.startswith(f"0 False usage: soundshard {command} [-h] [--input INPUT]"), (
            done.stderr
        )
    every = (
        "import contextlib, io, sys\n"
        "from soundshard.pipelines import cli\n"
        "for command in cli.COMMANDS:\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            cli.main([command, '--help'])\n"
        "        except SystemExit:\n"
        "            pass\n"
        "print(sorted({'apache_beam', 'tensorflow', 'keras', 'matplotlib', 'librosa'} & {*sys.modules}))\n"
    )
    done = subprocess.run([sys.executable, "-c", every], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "[]", done.stderr  # no command's help loads a heavy library
    from soundshard.pipelines import arguments, embed, features, tag

    for module, light in ((features, arguments.features_parser), (embed, arguments.embed_parser)):
        assert module.make_parser().format_help() == light().format_help()
    assert tag.make_parser().format_help() == arguments.tag_parser().format_help()


def test_native_stderr_goes_to_a_log_that_failures_point_to(tmp_path):
    # a failing command keeps the library log and says where it is; a clean one removes it
    script = (
        "import os, sys\n"
        "from soundshard.pipelines import cli\n"
        "def fail(argv):\n"
        "    os.write(2, b'native chatter\\n')\n"
        "    print('own message', file=sys.stderr)\n"
        "    return int(argv[0])\n"
        "cli.main = fail\n"
        "sys.argv = ['soundshard', sys.argv[1]]\n"
        "sys.exit(cli.console())\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    ok = subprocess.run([sys.executable, "-c", script, "0"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and ok.stderr == "own message\n" and not list(tmp_path.glob("*.log"))
    bad = subprocess.run([sys.executable, "-c", script, "3"], capture_output=True, text=True, env=env)
    (log,) = tmp_path.glob("soundshard-*.log")
    assert (
        bad.returncode == 3
        and bad.stderr == f"own message\nsoundshard: library messages of this run are in {log}\n"
    )
    assert log.read_text() == "native chatter\n"


def test_bash_completion_knows_every_command_and_flag(tmp_path):
    done = soundshard("completion", "bash", cwd=tmp_path)
    assert done.returncode == 0 and done.stderr == ""
    script = tmp_path / "soundshard.bash"
    script.write_text(done.stdout)

    def complete(*words: str) -> list[str]:
        words_text = " ".join(f"'{w}'" for w in words)
        shell = f"source {script}; COMP_WORDS=({words_text}); COMP_CWORD={len(words) - 1}; _soundshard; "
        shell += 'printf "%s\\n" "${COMPREPLY[@]}"'
        out = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, cwd=tmp_path, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    assert sorted(complete("soundshard", "co")) == ["compile-edge", "completion", "config"]
    assert complete("soundshard", "tag", "--min-level-a") == ["--min-level-above-floor-db"]
    assert "--test-fold" in complete("soundshard", "train", "--t")
    assert complete("soundshard", "config", "--d") == ["--defaults"]
    (tmp_path / "models").mkdir()
    assert complete("soundshard", "info", "mod") == ["models"]  # paths otherwise


def test_renamed_flags_keep_their_old_spelling_for_a_release(capsys):
    from soundshard.pipelines import arguments, compile_edge, train

    new = train.make_parser().parse_args(
        ["--features", "a", "--features", "b", "--arch", "sbcnn", "--output", "o"]
    )
    assert capsys.readouterr().err == ""
    old = train.make_parser().parse_args(
        ["--data", "a", "--features", "b", "--model", "sbcnn", "--output", "o"]
    )
    assert vars(old) == vars(new)
    err = capsys.readouterr().err
    assert "--data is now --features" in err and "--model is now --arch" in err
    evaluate = train.make_evaluate_parser()
    assert vars(evaluate.parse_args(["--model", "m", "--data", "d", "--fold", "2"])) == vars(
        evaluate.parse_args(["--model-dir", "m", "--features", "d", "--test-fold", "2"])
    )
    embed = arguments.embed_parser()
    old = embed.parse_args(["--model", "tflite:x", "--model-output", "emb", "--weights-sha256", "ab"])
    assert (old.model, old.embed__output, old.embed__model_sha256) == ("tflite:x", "emb", "ab")
    # hidden from --help, and a renamed required flag is satisfied by either spelling only
    help_text = compile_edge.make_parser().format_help()
    assert "--model-dir" in help_text and "--features" in help_text and "--data" not in help_text
    with pytest.raises(SystemExit):
        compile_edge.make_parser().parse_args(["--model-dir", "m", "--output", "o"])
    assert "required: --features" in capsys.readouterr().err
