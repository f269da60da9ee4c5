"""tar and zip archives as sources: members streamed, member paths kept, unsafe members refused."""

import io
import json
import stat
import tarfile
import zipfile

import pyarrow.parquet as pq
import soundfile

from soundshard.pipelines import features
from soundshard.transforms import sources

from .helpers import tone


def wav_bytes(duration_s: float = 1.0, fmt: str = "WAV") -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, tone(duration_s=duration_s), 22050, format=fmt)
    return buffer.getvalue()


def make_zip(path):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("dog/a.wav", wav_bytes())
        archive.writestr("cat/b.flac", wav_bytes(fmt="FLAC"))
        archive.writestr("bad.wav", b"not audio at all")
        archive.writestr("readme.txt", b"ignored: not audio")
        archive.writestr("../evil.wav", wav_bytes())
        link = zipfile.ZipInfo("link.wav")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc/passwd")


def make_tgz(path):
    with tarfile.open(path, "w:gz") as archive:
        for name, data in (("night/c.wav", wav_bytes(2.0)), ("/abs.wav", wav_bytes())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("night/link.wav")
        link.type = tarfile.SYMTYPE
        link.linkname = "../../outside.wav"
        archive.addfile(link)


def test_list_archive_reports_kinds(tmp_path):
    make_zip(tmp_path / "a.zip")
    kinds = {name: kind for name, kind, _ in sources.list_archive(str(tmp_path / "a.zip"))}
    assert kinds["dog/a.wav"] == "file" and kinds["link.wav"] == "link"
    items, dead = sources.expand_archive(str(tmp_path / "a.zip"), root=str(tmp_path))
    assert [(i.clip_id, i.archive_member) for i in items] == [
        ("a/dog/a", "dog/a.wav"),
        ("a/cat/b", "cat/b.flac"),
        ("a/bad", "bad.wav"),
    ]
    assert items[0].uri == f"zip://dog/a.wav::{tmp_path}/a.zip"
    assert sorted((d.clip_id, d.reason) for d in dead) == [
        ("a/../evil", "unsafe_member"),
        ("a/link", "unsafe_member"),
    ]
    only_dogs, _ = sources.expand_archive(str(tmp_path / "a.zip"), root=str(tmp_path), member_glob="dog/*")
    assert [i.archive_member for i in only_dogs] == ["dog/a.wav"]


def test_features_from_archives(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    make_zip(inputs / "batch1.zip")
    make_tgz(inputs / "batch2.tar.gz")
    (inputs / "plain.wav").write_bytes(wav_bytes())
    (inputs / "broken.zip").write_bytes(b"PK not really a zip")
    out = tmp_path / "out"
    assert features.run(["--input", str(inputs), "--output", str(out), "--format", "parquet"]) == 0
    dataset = json.loads((out / "dataset.json").read_text())
    fig = dataset["figures"]
    # inputs: 3 zip members + 1 tgz member + plain file processed or failed, 5 refused, 1 bad archive
    assert fig["inputs"] == 10 and fig["accounted_for"] is True
    assert fig["files_processed"] == 4
    table = pq.read_table(out / "parquet").to_pydict()
    by_clip = {c: m for c, m in zip(table["clip_id"], table["archive_member"], strict=True)}
    assert by_clip == {
        "batch1/dog/a": "dog/a.wav",
        "batch1/cat/b": "cat/b.flac",
        "batch2/night/c": "night/c.wav",
        "plain": None,
    }
    dead = pq.read_table(out / "dead_letters.parquet").to_pylist()
    reasons = sorted((d["clip_id"], d["reason"]) for d in dead)
    assert reasons == [
        ("batch1/../evil", "unsafe_member"),
        ("batch1/bad", "decode_error"),
        ("batch1/link", "unsafe_member"),
        ("batch2/abs", "unsafe_member"),
        ("batch2/night/link", "unsafe_member"),
        ("broken", "bad_archive"),
    ]
    # nothing was extracted anywhere: the only files written are the outputs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]
    assert not (tmp_path / "evil.wav").exists() and not (tmp_path.parent / "evil.wav").exists()
