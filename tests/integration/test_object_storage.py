"""The features pipeline with inputs and outputs in object storage (real emulator servers)."""

import io
import json
import uuid

import fsspec
import pyarrow.parquet as pq
import pytest

from soundshard.pipelines import features
from soundshard.pipelines.demo import make_dataset

pytestmark = pytest.mark.slow


def upload_demo(tmp_path, fs, bucket: str) -> str:
    """Synthesises the demo set locally and uploads it; returns the bucket path of the audio."""
    make_dataset(str(tmp_path / "demo"))
    fs.mkdir(bucket)
    fs.put(str(tmp_path / "demo" / "audio") + "/", f"{bucket}/audio/", recursive=True)
    fs.put(str(tmp_path / "demo" / "manifest.csv"), f"{bucket}/manifest.csv")
    return f"{bucket}/audio"


def check_outputs(fs, out: str, *, formats=("parquet", "tfrecord")):
    dataset = json.loads(fs.cat_file(f"{out}/dataset.json"))
    fig = dataset["figures"]
    assert (fig["inputs"], fig["files_processed"], fig["dead_letters"]) == (34, 32, 2)
    assert fig["accounted_for"] is True
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.find(out))
    assert names == sorted(
        ["dataset.json", "dead_letters.parquet"] + [f"windows-00000-of-00001.{f}" for f in formats]
    )
    table = pq.read_table(io.BytesIO(fs.cat_file(f"{out}/parquet/windows-00000-of-00001.parquet")))
    assert table.num_rows == 32 * 6
    assert sorted(set(table.column("label").to_pylist())) == ["chirp", "click_train", "hum", "noise_burst"]
    assert all(uri.startswith(out.split("://")[0]) for uri in table.column("source_uri").to_pylist()[:1])
    dead = pq.read_table(io.BytesIO(fs.cat_file(f"{out}/dead_letters.parquet"))).to_pylist()
    assert sorted(d["reason"] for d in dead) == ["decode_error", "empty_file"]


def test_gcs_input_and_output(gcs_env, tmp_path):
    fs, _ = fsspec.core.url_to_fs("gs://")
    bucket = f"audio-{uuid.uuid4().hex[:8]}"
    audio = upload_demo(tmp_path, fs, bucket)
    out = f"gs://{bucket}/features"
    code = features.run(
        ["--input", f"gs://{audio}", "--manifest", f"gs://{bucket}/manifest.csv", "--output", out]
    )
    assert code == 0
    fs.invalidate_cache()
    check_outputs(fs, out)
    # the source URIs written are the gs:// ones, and no temporary objects remain
    assert not [p for p in fs.find(bucket) if "_tmp-" in p]


def test_s3_input_and_output(s3_env, tmp_path):
    fs, _ = fsspec.core.url_to_fs("s3://")
    bucket = f"audio-{uuid.uuid4().hex[:8]}"
    audio = upload_demo(tmp_path, fs, bucket)
    out = f"s3://{bucket}/features"
    argv = ["--input", f"s3://{audio}", "--manifest", f"s3://{bucket}/manifest.csv", "--output", out]
    assert features.run([*argv, "--num_shards", "1"]) == 0
    fs.invalidate_cache()
    check_outputs(fs, out)


def test_gcs_esc10_clips_and_tar_archive(gcs_env, tmp_path):
    import tarfile

    from ..helpers import require_esc10

    esc10 = require_esc10()
    clips = sorted((esc10 / "audio").glob("*.flac"))
    fs, _ = fsspec.core.url_to_fs("gs://")
    bucket = f"esc10-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    for clip in clips[:30]:
        fs.put(str(clip), f"{bucket}/in/clips/{clip.name}")
    archive = tmp_path / "night.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for clip in clips[30:40]:
            tar.add(clip, arcname=f"recorder1/{clip.name}")
    fs.put(str(archive), f"{bucket}/in/night.tar.gz")
    out = f"gs://{bucket}/features"
    assert features.run(["--input", f"gs://{bucket}/in", "--output", out, "--format", "parquet"]) == 0
    fs.invalidate_cache()
    dataset = json.loads(fs.cat_file(f"{out}/dataset.json"))
    assert (dataset["figures"]["files_processed"], dataset["figures"]["dead_letters"]) == (40, 0)
    table = pq.read_table(
        io.BytesIO(fs.cat_file(f"{out}/parquet/windows-00000-of-00001.parquet"))
    ).to_pydict()
    members = {m for m in table["archive_member"] if m is not None}
    assert members == {f"recorder1/{clip.name}" for clip in clips[30:40]}
    assert table["window_index"].count(0) == 40
    archived = [u for u in table["source_uri"] if u.startswith("tar://")]
    assert archived and all(u.endswith(f"::gs://{bucket}/in/night.tar.gz") for u in archived)


def test_incremental_nights_on_gcs(gcs_env, tmp_path):
    """Object generations tell changed objects apart, even at the same size; outputs on GCS."""
    import numpy as np

    from soundshard.transforms.io import ledger

    from ..helpers import tone, write_audio

    fs, _ = fsspec.core.url_to_fs("gs://")
    bucket = f"night-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    for i, name in enumerate(["site=a/20261124_010000.flac", "site=b/20261124_010000.flac"]):
        local = write_audio(tmp_path / f"{i}.flac", tone(duration_s=1.0, freq_hz=200 + 100 * i), 22050)
        fs.put(str(local), f"{bucket}/in/{name}")
    out = f"gs://{bucket}/features"
    argv = ["--input", f"gs://{bucket}/in", "--output", out, "--incremental", "--format", "parquet"]
    argv += ["--site_pattern", "site=(?P<site>[^/]+)/"]
    assert features.run([*argv, "--run_date", "2026-11-24"]) == 0
    # The next night: one new object, and one replaced by other audio of the same size.
    replaced = write_audio(tmp_path / "r.flac", tone(duration_s=1.0, freq_hz=200, seed=7), 22050)
    fs.put(str(replaced), f"{bucket}/in/site=a/20261124_010000.flac")
    fs.put(str(tmp_path / "1.flac"), f"{bucket}/in/site=c/20261125_010000.flac")
    assert features.run([*argv, "--run_date", "2026-11-25"]) == 0
    assert features.run([*argv, "--run_date", "2026-11-25"]) == 0  # repeated: nothing new
    fs.invalidate_cache()
    table = ledger.read_ledger(out)
    assert len(set(table.column("run_id").to_pylist())) == 2
    second = [r["clip_id"] for r in table.to_pylist() if r["run_date"] == "2026-11-25"]
    assert sorted(second) == ["site=a/20261124_010000", "site=c/20261125_010000"]
    assert all(v.startswith("generation:") for v in table.column("version").to_pylist())
    shards = sorted(p for p in fs.find(f"{bucket}/features/parquet"))
    assert [p.split("/parquet/")[1].rsplit("/", 1)[0] for p in shards] == [
        "run_date=2026-11-24/site=a",
        "run_date=2026-11-24/site=b",
        "run_date=2026-11-25/site=a",
        "run_date=2026-11-25/site=c",
    ]
    rows = [r for p in shards for r in pq.read_table(io.BytesIO(fs.cat_file(p))).to_pylist()]
    assert len(rows) == 4 * 2 and not [p for p in fs.find(bucket) if "_tmp-" in p]
    night1, night2 = (
        np.asarray([r["log_mel"] for r in rows if r["site"] == "a" and r["start_s"] == 0][i]) for i in (0, 1)
    )
    assert not np.array_equal(night1, night2)  # the replaced object was read again


def test_small_remote_file_is_fetched_once(gcs_env, tmp_path):
    """Planning keeps a small object it fetched whole for the decode in the same process: decoding
    needs no request (the object can even be gone); unkept, split or replaced objects are fetched."""
    import dataclasses

    import numpy as np
    import soundfile

    from soundshard.schemas.config import FeatureConfig
    from soundshard.schemas.errors import StorageError
    from soundshard.schemas.records import SourceItem
    from soundshard.transforms.features.compute import LogMelGrid, decode_unit, fetched_key, plan
    from soundshard.transforms.io.storage import FETCHED

    fs, _ = fsspec.core.url_to_fs("gs://")
    bucket = f"once-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    local = tmp_path / "a.flac"
    tone = np.sin(np.arange(3 * 16000) * 2 * np.pi * 440 / 16000).astype(np.float32) * 0.5
    soundfile.write(local, tone, 16000)
    fs.put(str(local), f"{bucket}/a.flac")
    item = SourceItem(uri=f"gs://{bucket}/a.flac", clip_id="a", size_bytes=local.stat().st_size, version="1")
    config = FeatureConfig()
    grid = LogMelGrid(config)
    FETCHED.clear()
    try:
        fetched = plan(item, config)
        assert len(fetched) == 1 and len(FETCHED) == 0  # nothing kept unless asked
        expected, _ = decode_unit(fetched[0], grid)
        kept = plan(item, config, keep_reads=2)
        assert kept == fetched and FETCHED.take(fetched_key(item)) == local.read_bytes()
        fs.rm(f"{bucket}/a.flac")
        audio, span = decode_unit(kept[0], grid)  # the second of two reads: from memory
        assert span is None and np.array_equal(audio.samples, expected.samples)
        assert len(FETCHED) == 0  # taken as often as kept for
        with pytest.raises(StorageError, match="a.flac"):
            decode_unit(kept[0], grid)
        # a recording split into several units is never kept (each unit reads its own range)
        fs.put(str(local), f"{bucket}/a.flac")
        split = plan(item, config, unit_s=1.0, keep_reads=1)
        assert len(split) > 1 and len(FETCHED) == 0
        # a replaced object (another version) does not match what was kept of the old one
        plan(item, config, keep_reads=1)
        louder = local.with_name("b.flac")
        soundfile.write(louder, tone * 1.5, 16000)
        fs.put(str(louder), f"{bucket}/a.flac")
        replaced = dataclasses.replace(item, version="2", size_bytes=louder.stat().st_size)
        audio, _ = decode_unit(plan(replaced, config)[0], grid)
        assert np.allclose(audio.samples, expected.samples * 1.5, atol=1e-3)
        assert len(FETCHED) == 1  # the old version's bytes, never taken
    finally:
        FETCHED.clear()


def test_planning_and_decoding_stages_share_one_cache_through_beam_shared():
    """The kept objects are not a module global: the planning and decoding DoFns of a process
    acquire the same FetchedObjects through ``apache_beam.utils.shared.Shared``."""
    from soundshard.schemas.config import FeatureConfig
    from soundshard.transforms.features.compute import _LogMelFn, _ProbeFn, fetched_objects
    from soundshard.transforms.io.storage import FETCHED

    config = FeatureConfig()
    planner, decoder = _ProbeFn(config, None, keep_fetched=True), _LogMelFn(config)
    planner.setup()
    decoder.setup()
    try:
        assert planner._fetched is decoder._fetched is fetched_objects()
        assert planner._fetched is not FETCHED
        planner._fetched.put(("k",), b"abc")
        assert decoder._fetched.take(("k",)) == b"abc"
        unkept = _ProbeFn(config, None)  # runs whose units decode in other processes keep nothing
        unkept.setup()
        assert unkept._fetched is None
    finally:
        planner.teardown()
        decoder.teardown()
