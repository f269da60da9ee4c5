"""Hostile and unlucky inputs through the CLI: every input accounted for, each with its reason;
bad configuration stops the run with exit 2 and one line naming the value."""

import io
import json
import struct
import tarfile
import time
import warnings
import zipfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile

from soundshard.pipelines import features

from ..helpers import tone, write_audio


def wav(seconds: float = 1.0, *, rate: int = 22050, fmt: str = "WAV") -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, tone(duration_s=seconds, sample_rate_hz=rate), rate, format=fmt)
    return buffer.getvalue()


def tar_bytes(members) -> tuple[bytearray, list[int]]:
    buffer, offsets = io.BytesIO(), []
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            offsets.append(archive.offset)
            archive.addfile(info, io.BytesIO(data))
    return bytearray(buffer.getvalue()), offsets


#: clip id -> what must become of it: a number of windows, or (stage, reason) of its dead letter.
EXPECTED = {
    "good": 2,
    "x.wav": 2,  # x.wav and x.flac side by side: two inputs, two ids
    "x.flac": 4,
    "flac_named": 2,  # FLAC bytes in a .wav: read by content
    "tiny": 1,  # 10 ms, padded to one window
    "huge_header": 1,  # its data chunk claims 2 GB; the 0.5 s that are there are read
    "twice/d#1": 2,  # two tar entries with one name: both read
    "twice/d#2": 4,
    "damaged/a": 2,  # listed before the damaged header
    "evil/ok": 2,
    "empty": ("plan", "empty_file"),
    "garbage": ("plan", "decode_error"),
    "onehz": ("plan", "implausible_sample_rate"),  # 3.6 KB claiming 1 Hz: not 1,800 s of audio
    "nan": ("decode", "non_finite_audio"),
    "half": ("decode", "corrupt_audio"),
    "damaged": ("source", "archive_incomplete"),  # what follows the damaged header
    "notazip": ("source", "bad_archive"),
    "evil/../escape": ("source", "unsafe_member"),
    "evil/abs": ("source", "unsafe_member"),
}


def make_hostile_folder(root) -> None:
    files = {
        "good.wav": wav(),
        "empty.wav": b"",
        "garbage.wav": np.random.default_rng(0).bytes(3000),
        "nan.wav": None,
        "x.wav": wav(1.0),
        "x.flac": wav(2.0, fmt="FLAC"),
        "flac_named.wav": wav(1.0, fmt="FLAC"),
        "tiny.wav": wav(0.01),
        "half.flac": wav(3.0, fmt="FLAC")[:4000],
        "notazip.zip": b"PK\x03\x04 not a zip",
    }
    one_hz = bytearray(wav(0.1, rate=8000))
    struct.pack_into("<II", one_hz, 24, 1, 2)  # fmt chunk: 1 Hz, 2 bytes per second
    files["onehz.wav"] = bytes(one_hz)
    huge = bytearray(wav(0.5))
    struct.pack_into("<I", huge, 40, 2**31 - 2)  # data chunk size
    files["huge_header.wav"] = bytes(huge)
    damaged, offsets = tar_bytes([("a.wav", wav()), ("b.wav", wav()), ("c.wav", wav())])
    damaged[offsets[1] + 148 : offsets[1] + 156] = b"garbage!"
    files["damaged.tar"] = bytes(damaged)
    files["twice.tar"] = bytes(tar_bytes([("d.wav", wav(1.0)), ("d.wav", wav(2.0))])[0])
    root.mkdir(parents=True)
    for name, data in files.items():
        if data is not None:
            (root / name).write_bytes(data)
    soundfile.write(str(root / "nan.wav"), np.full(22050, np.nan, np.float32), 22050, subtype="FLOAT")
    with warnings.catch_warnings(), zipfile.ZipFile(root / "evil.zip", "w") as archive:
        warnings.simplefilter("ignore")
        for name in ("../escape.wav", "/abs.wav", "ok.wav"):
            archive.writestr(name, wav())
    (root / "folder.wav").mkdir()  # a folder named like audio is no input


def test_hostile_folder_every_input_accounted_for_with_its_reason(tmp_path, capsys):
    make_hostile_folder(tmp_path / "in")
    out = tmp_path / "out"
    argv = ["--input", str(tmp_path / "in"), "--output", str(out), "--format", "parquet"]
    assert features.run(argv) == features.EXIT_OK  # 9 of 19 failed: under the default limit
    fig = json.loads((out / "dataset.json").read_text())["figures"]
    table = pq.read_table(out / "parquet").to_pydict()
    windows = {clip: table["clip_id"].count(clip) for clip in set(table["clip_id"])}
    dead = {
        d["clip_id"]: (d["stage"], d["reason"])
        for d in pq.read_table(out / "dead_letters.parquet").to_pylist()
    }
    assert {**windows, **dead} == EXPECTED
    assert fig["inputs"] == len(EXPECTED) == fig["files_processed"] + fig["dead_letter_inputs"]
    assert fig["accounted_for"] is True
    # the same folder with a stricter limit: outputs written, exit 5, the share named
    capsys.readouterr()
    assert features.run([*argv, "--max-failed-fraction", "0.25"]) == features.EXIT_TOO_MANY_FAILURES
    assert "9 of 19 inputs (47%) failed, more than --max-failed-fraction 0.25" in capsys.readouterr().err


def test_manifest_rows_that_must_not_be_read(tmp_path):
    write_audio(tmp_path / "in" / "a.wav", tone(duration_s=1.0), 22050)
    write_audio(tmp_path / "in" / "b.wav", tone(duration_s=1.0), 22050)
    write_audio(tmp_path / "elsewhere" / "secret.wav", tone(duration_s=1.0), 22050)
    manifest = tmp_path / "meta.csv"
    outside = tmp_path / "elsewhere" / "secret.wav"
    manifest.write_text(
        f"filename,label,fold\na.wav,dog,1\nb.wav,cat,-1\n{outside},cat,2\n../elsewhere/secret.wav,cat,2\n"
    )
    out = tmp_path / "out"
    argv = ["--input", str(tmp_path / "in"), "--manifest", str(manifest), "--output", str(out)]
    assert features.run([*argv, "--format", "parquet", "--max-failed-fraction", "1"]) == 0
    dead = pq.read_table(out / "dead_letters.parquet").to_pylist()
    assert sorted((d["reason"], d["message"].split(":")[0]) for d in dead) == [
        ("bad_fold", "row 3"),
        ("outside_input", "row 4"),
        ("outside_input", "row 5"),
    ]
    assert "fold='-1' is not a fold number (0 or more)" in next(
        d["message"] for d in dead if d["reason"] == "bad_fold"
    )
    assert set(pq.read_table(out / "parquet").column("clip_id").to_pylist()) == {"a"}
    out2 = tmp_path / "out2"
    argv2 = [
        *argv[:-1],
        str(out2),
        "--format",
        "parquet",
        "--allow-outside-input",
        "--max-failed-fraction",
        "1",
    ]
    assert features.run(argv2) == 0
    assert set(pq.read_table(out2 / "parquet").column("source_uri").to_pylist()) == {
        str(tmp_path / "in" / "a.wav"),
        str(outside),
    }
    dead = pq.read_table(out2 / "dead_letters.parquet").to_pylist()
    assert sorted(d["reason"] for d in dead) == ["bad_fold", "duplicate_row"]  # '..' spelled the same file


@pytest.mark.parametrize(
    ("make", "extra", "message"),
    [
        ("file", [], "is a file, not a folder"),
        ("under_file", [], "cannot create the folder"),
        (None, ["--direct_num_workers", "-1"], "--direct_num_workers=-1 must be 0 (one per core) or more"),
        (None, ["--source-rates-hz", "8000"], "--source-rates-hz='8000' is not MIN:MAX"),
        (None, ["--max-failed-fraction", "2"], "--max-failed-fraction=2.0 must lie between 0 and 1"),
        ("toml", [], "sets 'n_mels' both at the top level and under [features]"),
    ],
)
def test_bad_configuration_exits_2_naming_the_value(tmp_path, capsys, make, extra, message):
    write_audio(tmp_path / "in" / "a.wav", tone(duration_s=1.0), 22050)
    out = tmp_path / "out"
    if make == "file":
        out.write_text("not a folder")
    elif make == "under_file":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "out"
    elif make == "toml":
        (tmp_path / "c.toml").write_text("n_mels = 40\n\n[features]\nn_mels = 64\n")
        extra = ["--config", str(tmp_path / "c.toml")]
    assert features.run(["--input", str(tmp_path / "in"), "--output", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("store", ["gcs", "s3"])
def test_unreachable_or_missing_store_is_one_line_within_seconds(store, request, monkeypatch, capsys):
    from ..emulators import free_port

    request.getfixturevalue(f"{store}_env")
    protocol = {"gcs": "gs", "s3": "s3"}[store]
    started = time.monotonic()
    assert features.run(["--input", f"{protocol}://no-such-bucket/audio", "--output", "/tmp/x"]) == 2
    err = capsys.readouterr().err
    assert f"the bucket {protocol}://no-such-bucket does not exist" in err
    import fsspec

    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    if store == "gcs":
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", closed)
    else:  # s3fs takes its endpoint from fsspec's config, read from the environment at import
        monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
        monkeypatch.setitem(
            fsspec.config.conf, "s3", {**fsspec.config.conf.get("s3", {}), "endpoint_url": closed}
        )
    fsspec.get_filesystem_class(protocol).clear_instance_cache()  # made with the old endpoint
    assert features.run(["--input", f"{protocol}://sensors/night", "--output", "/tmp/x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"cannot reach the store of {protocol}://sensors" in err and "credentials:" in err
    assert time.monotonic() - started < 30
