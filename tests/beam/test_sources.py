import pytest

from soundshard.schemas.errors import ConfigError
from soundshard.transforms.io import listing

from ..helpers import tone, write_audio


@pytest.fixture
def tree(tmp_path):
    for rel in ("dog/a.wav", "dog/b.flac", "cat/c.wav", "fold1/d.wav", "notes.txt"):
        path = tmp_path / "audio" / rel
        if rel.endswith(".txt"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("x")
        else:
            write_audio(path, tone(duration_s=0.1), 22050)
    return tmp_path


def test_folder_listing_with_parent_labels(tree):
    found = listing.from_listing(str(tree / "audio"), label_from_parent=True)
    ids = [i.clip_id for i in found.items]
    assert ids == ["cat/c", "dog/a", "dog/b", "fold1/d"]
    assert [i.label for i in found.items] == ["cat", "dog", "dog", "fold1"]
    assert found.label_map == {"cat": 0, "dog": 1, "fold1": 2}
    assert all(i.size_bytes and i.size_bytes > 44 for i in found.items)


def test_glob_listing(tree):
    found = listing.from_listing(str(tree / "audio" / "**" / "*.wav"))
    assert [i.clip_id for i in found.items] == ["cat/c", "dog/a", "fold1/d"]
    assert all(i.label is None for i in found.items)
    with pytest.raises(ConfigError, match="matched no audio files"):
        listing.from_listing(str(tree / "audio" / "*.mp3"))
    with pytest.raises(ConfigError, match="does not exist"):
        listing.from_listing(str(tree / "nowhere"))


def test_manifest_rows_become_items_or_dead_letters(tree):
    manifest = tree / "meta.csv"
    manifest.write_text(
        "filename,fold,category,src_file\n"
        "dog/a.wav,1,dog,111\n"
        "d.wav,2,cat,222\n"  # found by name under fold1/ (UrbanSound8K style)
        "cat/c.wav,3,,333\n"  # empty label
        "dog/missing.wav,1,dog,444\n"
        "dog/a.wav,1,dog,111\n"  # duplicate
        "dog/b.flac,x,dog,555\n"  # bad fold
    )
    found = listing.from_manifest(str(manifest), input_uri=str(tree / "audio"))
    assert [(i.clip_id, i.label, i.fold) for i in found.items] == [
        ("dog/a", "dog", 1),
        ("fold1/d", "cat", 2),
    ]
    assert found.items[0].extra == (("src_file", "111"),)
    assert found.extra_columns == ("src_file",)
    reasons = sorted((d.reason, d.stage) for d in found.dead_letters)
    assert reasons == [
        ("bad_fold", "manifest"),
        ("duplicate_row", "manifest"),
        ("empty_label", "manifest"),
        ("missing_file", "source"),
    ]
    assert found.n_inputs == 6
    assert found.label_map == {"cat": 0, "dog": 1}
    missing = next(d for d in found.dead_letters if d.reason == "missing_file")
    assert "dog/missing.wav" in missing.message and missing.source_uri.endswith("dog/missing.wav")


def test_manifest_column_errors(tree):
    manifest = tree / "meta.csv"
    manifest.write_text("name,label\nx.wav,dog\n")
    with pytest.raises(ConfigError, match="no filename column"):
        listing.from_manifest(str(manifest), input_uri=str(tree / "audio"))
    with pytest.raises(ConfigError, match="--label_column 'klass' is not a manifest column"):
        listing.from_manifest(
            str(manifest),
            input_uri=str(tree / "audio"),
            columns=listing.ManifestColumns(filename="name", label="klass"),
        )
    with pytest.raises(ConfigError, match="does not exist"):
        listing.from_manifest(str(tree / "nope.csv"), input_uri=str(tree / "audio"))


def test_parquet_manifest(tree):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tree / "meta.parquet"
    pq.write_table(pa.table({"filename": ["dog/b.flac"], "label": ["dog"], "split": ["train"]}), path)
    found = listing.from_manifest(str(path), input_uri=str(tree / "audio"))
    assert [(i.clip_id, i.label, i.split) for i in found.items] == [("dog/b", "dog", "train")]


def test_files_differing_only_by_extension_keep_apart(tmp_path):
    import json

    import pyarrow.parquet as pq

    from soundshard.pipelines import features

    from ..helpers import tone, write_audio

    inputs = tmp_path / "in"
    write_audio(inputs / "x.wav", tone(duration_s=1.0), 22050)
    write_audio(inputs / "x.flac", tone(duration_s=3.0), 22050)
    write_audio(inputs / "y.wav", tone(duration_s=1.0), 22050)
    found = listing.from_listing(str(inputs))
    assert sorted(i.clip_id for i in found.items) == ["x.flac", "x.wav", "y"]
    manifest = tmp_path / "meta.csv"
    manifest.write_text("filename,label\nx.wav,a\nx.flac,b\n")
    listed = listing.from_manifest(str(manifest), input_uri=str(inputs))
    assert not listed.dead_letters
    assert sorted((i.clip_id, i.label) for i in listed.items) == [("x.flac", "b"), ("x.wav", "a")]
    out = tmp_path / "out"
    assert features.run(["--input", str(inputs), "--output", str(out), "--format", "parquet"]) == 0
    assert json.loads((out / "dataset.json").read_text())["figures"]["files_processed"] == 3
    table = pq.read_table(out / "parquet").to_pydict()
    ends = {}
    for clip, uri, end in zip(table["clip_id"], table["source_uri"], table["end_s"], strict=True):
        ends[clip] = max(ends.get(clip, 0.0), end)
        assert uri.endswith(clip if "." in clip else clip + ".wav")
    assert round(ends["x.wav"]) == 1 and round(ends["x.flac"]) == 3


def test_unique_clip_ids_numbers_what_extensions_cannot_separate():
    from soundshard.schemas.records import SourceItem

    items = [
        SourceItem("/a/x.wav", "x"),
        SourceItem("/b/x.wav", "x"),
        SourceItem("/b/x.flac", "x"),
        SourceItem("/b/z.wav", "z"),
    ]
    assert [i.clip_id for i in listing.unique_clip_ids(items)] == ["x.wav#1", "x.wav#2", "x.flac", "z"]
