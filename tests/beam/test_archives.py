"""tar and zip archives as sources: members streamed, member paths kept, unsafe members refused."""

import io
import json
import stat
import tarfile
import zipfile

import pyarrow.parquet as pq
import soundfile

from soundshard.pipelines import features
from soundshard.transforms.io import archives, listing

from ..helpers import tone


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
    kinds = {m.name: m.kind for m in archives.list_archive(str(tmp_path / "a.zip")).members}
    assert kinds["dog/a.wav"] == "file" and kinds["link.wav"] == "link"
    items, dead = listing.expand_archive(str(tmp_path / "a.zip"), root=str(tmp_path))
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
    only_dogs, _ = listing.expand_archive(str(tmp_path / "a.zip"), root=str(tmp_path), member_glob="dog/*")
    assert [i.archive_member for i in only_dogs] == ["dog/a.wav"]


def test_features_from_archives(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    make_zip(inputs / "batch1.zip")
    make_tgz(inputs / "batch2.tar.gz")
    (inputs / "plain.wav").write_bytes(wav_bytes())
    (inputs / "broken.zip").write_bytes(b"PK not really a zip")
    out = tmp_path / "out"
    argv = ["--input", str(inputs), "--output", str(out), "--format", "parquet", "--max-failed-fraction", "1"]
    assert features.run(argv) == 0
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


def make_tar(path, members, *, mode="w"):
    """A tar of ``(name, bytes)`` members; returns each member's header offset."""
    offsets = []
    with tarfile.open(path, mode) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            offsets.append(archive.offset)
            archive.addfile(info, io.BytesIO(data))
    return offsets


def test_tar_damaged_part_way_lists_what_precedes_and_says_where(tmp_path):
    path = tmp_path / "night.tar"
    offsets = make_tar(path, [(f"{n}.wav", wav_bytes()) for n in "abc"])
    raw = bytearray(path.read_bytes())
    raw[offsets[1] + 148 : offsets[1] + 156] = b"garbage!"  # the second header's checksum
    path.write_bytes(bytes(raw))
    listed = archives.list_archive(str(path))
    assert [m.name for m in listed.members] == ["a.wav"]
    assert f"byte {offsets[1]}" in listed.problem
    items, dead = listing.expand_archive(str(path), root=str(tmp_path))
    assert [i.clip_id for i in items] == ["night/a"]
    assert [(d.clip_id, d.stage, d.reason) for d in dead] == [("night", "source", "archive_incomplete")]
    assert f"byte {offsets[1]}" in dead[0].message and "1 entries before it" in dead[0].message


def test_truncated_compressed_tar_keeps_members_before_the_cut(tmp_path):
    import gzip

    tar_path = tmp_path / "x.tar"
    make_tar(tar_path, [(f"{n}.wav", wav_bytes(duration_s=2.0, fmt="WAV")) for n in "abcd"])
    packed = gzip.compress(tar_path.read_bytes(), compresslevel=1)
    tar_path.unlink()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "cut.tar.gz").write_bytes(packed[: int(len(packed) * 0.6)])
    listed = archives.list_archive(str(tmp_path / "in" / "cut.tar.gz"))
    assert 1 <= len(listed.members) < 4 and listed.problem and "byte" in listed.problem
    out = tmp_path / "out"
    features.run(["--input", str(tmp_path / "in"), "--output", str(out), "--format", "parquet"])
    fig = json.loads((out / "dataset.json").read_text())["figures"]
    # every listed member is processed or dead-lettered, plus one dead letter for the lost rest
    assert fig["accounted_for"] is True and fig["inputs"] == len(listed.members) + 1
    assert fig["dead_letters_by_reason"].get("archive_incomplete") == 1
    assert fig["files_processed"] >= 1


def test_members_sharing_a_name_are_all_read(tmp_path):
    import warnings

    inputs = tmp_path / "in"
    inputs.mkdir()
    make_tar(
        inputs / "t.tar", [("a.wav", wav_bytes(1.0)), ("b.wav", wav_bytes(1.0)), ("a.wav", wav_bytes(3.0))]
    )
    with warnings.catch_warnings(), zipfile.ZipFile(inputs / "z.zip", "w") as archive:
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        archive.writestr("a.wav", wav_bytes(2.0))
        archive.writestr("a.wav", wav_bytes(4.0))
    items, dead = listing.expand_archive(str(inputs / "t.tar"), root=str(inputs))
    assert not dead
    assert [(i.clip_id, i.uri.split("::")[0]) for i in items] == [
        ("t/a#1", "tar://a.wav#1"),
        ("t/b", "tar://b.wav"),
        ("t/a#2", "tar://a.wav#2"),
    ]
    out = tmp_path / "out"
    assert features.run(["--input", str(inputs), "--output", str(out), "--format", "parquet"]) == 0
    fig = json.loads((out / "dataset.json").read_text())["figures"]
    assert fig["inputs"] == 5 and fig["files_processed"] == 5 and fig["accounted_for"] is True
    table = pq.read_table(out / "parquet").to_pydict()
    ends = {}
    for clip, end in zip(table["clip_id"], table["end_s"], strict=True):
        ends[clip] = max(ends.get(clip, 0.0), end)
    # each entry's own audio: 1 s, 1 s, 3 s in the tar, 2 s and 4 s in the zip
    assert sorted(ends) == ["t/a#1", "t/a#2", "t/b", "z/a#1", "z/a#2"]
    assert [round(ends[c]) for c in ("t/a#1", "t/a#2", "z/a#1", "z/a#2")] == [1, 3, 2, 4]


def test_an_archive_stays_open_while_any_reading_stage_holds_it(tmp_path):
    # planning and decoding DoFns share the process's open archives: one tearing down must not
    # close an archive the other is still reading; the last to go forgets them all
    path = tmp_path / "a.zip"
    make_zip(path)
    member = f"zip://dog/a.wav::{path.as_uri()}"
    archives.close_archives()
    archives.hold_archives()  # the planner
    archives.hold_archives()  # the decoder
    try:
        first = archives._open_archive(path.as_uri())
        assert soundfile.info(archives.open_source(member)).frames == 22050
        archives.release_archives()  # the planner tears down
        assert archives._ARCHIVES.open_uris == (path.as_uri(),)
        assert archives._open_archive(path.as_uri()) is first  # not opened again
    finally:
        archives.release_archives()  # the decoder tears down: the last hold
    assert archives._ARCHIVES.open_uris == ()
    # at most four archives stay open; the least recently used goes first
    uris = []
    for k in range(5):
        make_zip(tmp_path / f"{k}.zip")
        uris.append((tmp_path / f"{k}.zip").as_uri())
        archives._open_archive(uris[-1])
    assert archives._ARCHIVES.open_uris == tuple(uris[1:])
    archives.close_archives()
