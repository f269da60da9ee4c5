"""Storage faults: transient errors are retried, a file that keeps failing becomes a dead letter, and
the run completes without partial output. Inputs live on the GCS emulator behind a proxy that fails,
resets or stalls chosen requests (``tests/emulators.py``); outputs go to local disk."""

import collections
import io
import json
import time
import uuid

import apache_beam as beam
import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from soundshard.pipelines import features
from soundshard.schemas.errors import ConfigError, StorageError
from soundshard.schemas.storage import StorageConfig
from soundshard.transforms.io import adapters, archives, storage

from ..emulators import Fault, fault_proxy
from ..helpers import tone

pytestmark = pytest.mark.slow

#: Small limits so that faults cost about a second: 3 attempts of at most 1 s each.
RETRY_ENV = {
    "SOUNDSHARD_STORAGE_ATTEMPTS": "3",
    "SOUNDSHARD_STORAGE_ATTEMPT_TIMEOUT_S": "1",
    "SOUNDSHARD_STORAGE_DEADLINE_S": "10",
    "SOUNDSHARD_STORAGE_BACKOFF_S": "0.05",
}


@pytest.fixture
def proxy(gcs_env, monkeypatch):
    """A fault proxy in front of the GCS emulator, used by gcsfs for the test's duration."""
    with fault_proxy(gcs_env["STORAGE_EMULATOR_HOST"]) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)  # gcsfs reads it for every request
        for name, value in RETRY_ENV.items():
            monkeypatch.setenv(name, value)
        yield proxy


def audio_bytes(*, duration_s: float, freq_hz: float, fmt: str = "WAV") -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, tone(duration_s=duration_s, freq_hz=freq_hz), 22050, format=fmt)
    return buffer.getvalue()


def upload(files: dict[str, bytes]) -> str:
    """Puts ``files`` under ``gs://<new bucket>/in/``; returns the input URI."""
    fs = fsspec.filesystem("gs")
    bucket = f"faults-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    for name, data in files.items():
        fs.pipe(f"{bucket}/in/{name}", data)
    return f"gs://{bucket}/in"


def run_with_counters(argv: list[str]) -> tuple[collections.Counter, dict]:
    """Runs the features pipeline (listing, ``build``, local runner) and returns its soundshard
    counters and ``dataset.json``."""
    args, beam_args = features.make_parser().parse_known_args(argv)
    feature_run = features.prepare(args)
    p = beam.Pipeline(runner=FnApiRunner(), options=PipelineOptions(beam_args))
    features.build(p, feature_run)
    result = p.run()
    result.wait_until_finish()
    counters = collections.Counter()  # the same counter is reported per step: add them up
    for counter in result.metrics().query(MetricsFilter().with_namespace("soundshard"))["counters"]:
        counters[counter.key.metric.name] += counter.committed
    return counters, features.read_dataset_json(args.output)


def windows(out) -> dict[tuple[str, int], np.ndarray]:
    table = pq.read_table(out / "parquet").to_pydict()
    return {
        (clip, index): np.asarray(log_mel, dtype=np.float32)
        for clip, index, log_mel in zip(
            table["clip_id"], table["window_index"], table["log_mel"], strict=True
        )
    }


def output_files(out) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def test_transient_errors_are_retried_and_change_nothing(proxy, tmp_path):
    files = {
        "steady.wav": audio_bytes(duration_s=1.5, freq_hz=440),
        "flaky.flac": audio_bytes(duration_s=2.0, freq_hz=660, fmt="FLAC"),
        "dropped.wav": audio_bytes(duration_s=1.2, freq_hz=880),
    }
    local = tmp_path / "local"
    local.mkdir()
    for name, data in files.items():
        (local / name).write_bytes(data)
    assert features.run(["--input", str(local), "--output", str(tmp_path / "baseline")]) == 0

    source = upload(files)
    flaky = proxy.add(Fault("/o/in/flaky.flac", times=2))  # two 503 answers, then normal
    # aiohttp resends a request once when its connection is reset; the second reset is retried here
    dropped = proxy.add(Fault("/o/in/dropped.wav", action="reset", times=2))
    counters, dataset = run_with_counters(["--input", source, "--output", str(tmp_path / "out")])

    assert (flaky.failed, dropped.failed) == (2, 2)
    assert counters["storage_retries"] == 3
    assert counters["files_processed"] == 3 and counters["dead_letters"] == 0
    assert dataset["figures"]["accounted_for"] is True
    got, expected = windows(tmp_path / "out"), windows(tmp_path / "baseline")
    assert sorted(got) == sorted(expected) and {c for c, _ in got} == {"steady", "flaky", "dropped"}
    assert all(np.array_equal(got[key], expected[key]) for key in expected)


def test_a_file_that_keeps_failing_is_a_dead_letter(proxy, tmp_path):
    source = upload(
        {
            "good1.wav": audio_bytes(duration_s=1.0, freq_hz=440),
            "good2.flac": audio_bytes(duration_s=1.0, freq_hz=550, fmt="FLAC"),
            "dead.wav": audio_bytes(duration_s=1.0, freq_hz=660),
            # over one read-ahead block (4 MB), so decoding fetches it again: small files
            # are kept in memory after the header read and are not fetched twice
            "late.wav": audio_bytes(duration_s=100.0, freq_hz=770),
        }
    )
    dead = proxy.add(Fault("/o/in/dead.wav"))  # every request: 503
    # the header is read once (plan), then every read of the samples (decode) is reset
    late = proxy.add(Fault(("/o/in/late.wav", "alt=media"), action="reset", skip=1))
    out = tmp_path / "out"

    assert features.run(["--input", source, "--output", str(out), "--unit_s", "0"]) == 0

    # attempts are bounded and made once per file (aiohttp resends once per reset connection)
    assert (dead.hits, late.hits) == (3, 1 + 3 * 2)
    figures = json.loads((out / "dataset.json").read_text())["figures"]
    assert (figures["inputs"], figures["files_processed"], figures["dead_letters"]) == (4, 2, 2)
    assert figures["accounted_for"] is True
    assert figures["dead_letters_by_reason"] == {"storage_error": 2}
    # a small object is fetched once: planning keeps its bytes for the decoding in this process
    media = collections.Counter(
        path.split("?")[0].rsplit("/", 1)[1] for _, path, _ in proxy.requests if "alt=media" in path
    )
    assert media == {"good1.wav": 1, "good2.flac": 1, "dead.wav": 3, "late.wav": 1 + 3 * 2}
    letters = sorted(pq.read_table(out / "dead_letters.parquet").to_pylist(), key=lambda d: d["clip_id"])
    assert [(d["clip_id"], d["stage"], d["reason"], d["error_type"]) for d in letters] == [
        ("dead", "plan", "storage_error", "StorageError"),
        ("late", "decode", "storage_error", "StorageError"),
    ]
    for letter in letters:
        assert letter["message"].startswith(f"{source}/{letter['clip_id']}.wav: reading bytes 0..")
        assert "gave up after 3 attempt(s)" in letter["message"]
    assert "HttpError: injected fault, 503" in letters[0]["message"]
    assert {c for c, _ in windows(out)} == {"good1", "good2"}
    assert output_files(out) == [
        "dataset.json",
        "dead_letters.parquet",
        "parquet/windows-00000-of-00001.parquet",
        "tfrecord/windows-00000-of-00001.tfrecord",
    ]


def test_stalled_requests_are_cut_off(proxy, tmp_path):
    source = upload(
        {
            "slow.wav": audio_bytes(duration_s=1.0, freq_hz=440),
            "frozen.wav": audio_bytes(duration_s=1.0, freq_hz=550),
            "ok.wav": audio_bytes(duration_s=1.0, freq_hz=660),
        }
    )
    slow = proxy.add(Fault("/o/in/slow.wav", action="stall", stall_s=60, times=1))
    frozen = proxy.add(Fault("/o/in/frozen.wav", action="stall", stall_s=60))
    started = time.monotonic()
    counters, dataset = run_with_counters(["--input", source, "--output", str(tmp_path / "out")])
    elapsed_s = time.monotonic() - started

    assert elapsed_s < 20  # 1 + 3 attempts of 1 s, not minutes
    assert (slow.failed, frozen.failed) == (1, 3)
    assert counters["storage_retries"] == 1 + 2
    assert counters["files_processed"] == 2 and counters["storage_error"] == 1
    assert dataset["figures"]["accounted_for"] is True
    assert {c for c, _ in windows(tmp_path / "out")} == {"slow", "ok"}
    letters = pq.read_table(tmp_path / "out" / "dead_letters.parquet").to_pylist()
    assert [(d["clip_id"], d["stage"], d["reason"]) for d in letters] == [("frozen", "plan", "storage_error")]
    assert "TimeoutError: no answer within 1 s" in letters[0]["message"]


def test_s3_requests_are_retried_here_only(s3_env, monkeypatch):
    fs = fsspec.filesystem("s3")
    bucket = f"faults-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    data = audio_bytes(duration_s=1.0, freq_hz=440)
    for name in ("flaky.wav", "dead.wav"):
        fs.pipe(f"{bucket}/{name}", data)
    with fault_proxy(s3_env["AWS_ENDPOINT_URL"]) as proxy:
        monkeypatch.setitem(fsspec.config.conf, "s3", {**fsspec.config.conf["s3"], "endpoint_url": proxy.url})
        settings = StorageConfig.from_env(RETRY_ENV)  # as the launcher resolves them for a run
        # one read before the faults: the client's set-up (session, credentials, connection) is not
        # a request the 1 s limit of the counted attempts should have to cover
        warm = archives.open_source(f"s3://{bucket}/flaky.wav", size_bytes=len(data), retry=settings)
        assert warm.read(4) == data[:4]
        flaky = proxy.add(Fault(f"/{bucket}/flaky.wav", times=2))
        dead = proxy.add(Fault(f"/{bucket}/dead.wav"))
        retries = []
        source = archives.open_source(
            f"s3://{bucket}/flaky.wav", size_bytes=len(data), on_retry=retries.append, retry=settings
        )
        assert source.read() == data
        assert (flaky.hits, len(retries)) == (3, 2)

        source = archives.open_source(
            f"s3://{bucket}/dead.wav", size_bytes=len(data), on_retry=retries.append, retry=settings
        )
        with pytest.raises(
            StorageError, match=rf"s3://{bucket}/dead.wav: reading bytes 0\.\.{len(data) - 1} gave up"
        ):
            source.read(10)
        with pytest.raises(StorageError):  # the failure sticks: no second round of retries
            source.read(10)
    # three requests in all: neither s3fs nor botocore retried on their own
    assert (dead.hits, len(retries)) == (3, 2 + 2)
    assert storage.storage_error(source) is not None


def test_missing_object_is_not_retried(s3_env):
    fs = fsspec.filesystem("s3")
    bucket = f"faults-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    retries = []
    with pytest.raises(StorageError) as failure:
        archives.open_source(f"s3://{bucket}/gone.wav", on_retry=retries.append)
    assert failure.value.reason == "missing_file" and retries == []
    assert f"s3://{bucket}/gone.wav" in str(failure.value)


def test_retry_settings_from_the_environment():
    retry = storage.StorageRetry.from_env(
        {"SOUNDSHARD_STORAGE_ATTEMPTS": "2", "SOUNDSHARD_STORAGE_DEADLINE_S": "5"}
    )
    assert (retry.attempts, retry.deadline_s, retry.attempt_timeout_s) == (2, 5.0, 10.0)
    assert all(0.125 <= retry.pause_s(0) <= 0.25 for _ in range(20))
    assert retry.pause_s(10) <= retry.max_backoff_s
    with pytest.raises(ConfigError, match="SOUNDSHARD_STORAGE_ATTEMPTS='many'"):
        storage.StorageRetry.from_env({"SOUNDSHARD_STORAGE_ATTEMPTS": "many"})
    with pytest.raises(ConfigError, match="deadline_s=0.0"):
        storage.StorageRetry.from_env({"SOUNDSHARD_STORAGE_DEADLINE_S": "0"})
    assert storage.StorageRetry.from_env({"SOUNDSHARD_STORAGE_CACHE_MB": "0.5"}).cache_mb == 0.5
    with pytest.raises(ConfigError, match="cache_mb=-1.0"):
        storage.StorageRetry.from_env({"SOUNDSHARD_STORAGE_CACHE_MB": "-1"})


def test_storage_settings_are_resolved_on_the_launcher_and_recorded(tmp_path, monkeypatch, capsys):
    """Flags over the launcher's environment over the defaults; a bad value stops the run before
    any worker starts (exit 2, naming it); the settings the workers used are in dataset.json."""
    (tmp_path / "in").mkdir()
    soundfile.write(tmp_path / "in" / "a.wav", tone(duration_s=1.0, freq_hz=440), 22050)
    argv = ["--input", str(tmp_path / "in"), "--format", "parquet"]
    monkeypatch.setenv("SOUNDSHARD_STORAGE_ATTEMPTS", "6")
    monkeypatch.setenv("SOUNDSHARD_STORAGE_DEADLINE_S", "12")
    flags = ["--storage-deadline-s", "20", "--storage-read-ahead", "2"]
    assert features.run([*argv, "--output", str(tmp_path / "out"), *flags]) == 0
    recorded = json.loads((tmp_path / "out" / "dataset.json").read_text())["storage"]
    expected = StorageConfig(attempts=6, deadline_s=20.0, read_ahead=2)
    assert recorded == expected.to_dict() and storage.active() == expected
    assert features.run([*argv, "--output", str(tmp_path / "x"), "--storage-attempts", "0"]) == 2
    assert "attempts=0 must be at least 1" in capsys.readouterr().err
    monkeypatch.setenv("SOUNDSHARD_STORAGE_ATTEMPT_TIMEOUT_S", "soon")
    assert features.run([*argv, "--output", str(tmp_path / "y")]) == 2
    assert "SOUNDSHARD_STORAGE_ATTEMPT_TIMEOUT_S='soon' is not float" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_fetched_objects_are_bounded_and_taken_as_often_as_put():
    kept = storage.FetchedObjects(limit_bytes=10)
    assert kept.put(("a",), b"aaaa", reads=2) and kept.put(("b",), b"bbbb")
    assert (len(kept), kept.held_bytes) == (2, 8)
    assert kept.take(("a",)) == b"aaaa" and kept.take(("a",)) == b"aaaa"  # a recording and its copy
    assert kept.take(("a",)) is None and kept.held_bytes == 4
    assert kept.put(("c",), b"cccc") and kept.put(("d",), b"dddd")  # over the limit: oldest out
    assert kept.take(("b",)) is None and (len(kept), kept.held_bytes) == (2, 8)
    assert not kept.put(("e",), b"e" * 11) and len(kept) == 2  # larger than the limit: not kept
    assert kept.put(("c",), b"CC") and kept.take(("c",)) == b"CC"  # put again: replaced
    assert not kept.put(("f",), b"f", reads=0)
    kept.clear()
    assert (len(kept), kept.held_bytes, kept.take(("d",))) == (0, 0, None)


def test_the_library_internals_the_store_adapters_use_are_there():
    """A gcsfs, s3fs or fsspec release that changes what ``io/adapters.py`` relies on fails here,
    not quietly by bringing back a library's own retry loop."""
    assert adapters.layout_problems() == []
    import gcsfs
    import s3fs

    gcs = adapters.single_attempt_class(gcsfs.GCSFileSystem)
    assert gcs is not gcsfs.GCSFileSystem and not hasattr(gcs._request, "__wrapped__")
    assert adapters.single_attempt_class(s3fs.S3FileSystem).retries == 1
    local = fsspec.filesystem("file")
    assert adapters.single_attempt(local, attempt_timeout_s=1.0) is local and not adapters.is_async(local)
