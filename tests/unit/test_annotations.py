"""Annotation files: Audacity label tracks and Raven selection tables (pure, no Beam)."""

from __future__ import annotations

import pytest

from soundshard.schemas.errors import ConfigError
from soundshard.transforms.labels import annotations as ann
from soundshard.transforms.labels.annotations import Annotation, AnnotationError

RAVEN_HEADER = (
    "Selection\tView\tChannel\tBegin Time (s)\tEnd Time (s)\tLow Freq (Hz)\tHigh Freq (Hz)\tSpecies"
)


def test_audacity_track_with_spaces_empty_label_point_label_and_spectral_lines():
    text = (
        "1.000000\t2.500000\tdog bark\n"
        "\\\t300.000000\t4000.000000\n"
        "3.0\t3.0\t\n"  # a point label without text
        "\n"
        "4.25\t6\train\n"
        "\\\t-1.000000\t8000\n"  # Audacity writes -1 for an undefined bound
        "7\t8\n"  # no label column at all
    )
    assert ann.detect_format(text) == "audacity"
    assert ann.parse_annotations(text) == [
        Annotation(1.0, 2.5, "dog bark", 300.0, 4000.0),
        Annotation(3.0, 3.0, ""),
        Annotation(4.25, 6.0, "rain", None, 8000.0),
        Annotation(7.0, 8.0, ""),
    ]


def test_bom_and_crlf_and_cr_are_tolerated(tmp_path):
    path = tmp_path / "night1.txt"
    path.write_bytes("\ufeff0.5\t1.5\tchirp\r\n\r\n2\t3\thum\r\n".encode())
    assert ann.read_annotations(str(path)) == [Annotation(0.5, 1.5, "chirp"), Annotation(2.0, 3.0, "hum")]
    assert ann.parse_annotations("0\t1\ta\r2\t3\tb\r") == [Annotation(0, 1, "a"), Annotation(2, 3, "b")]
    raven = "\ufeff" + RAVEN_HEADER + "\r\n1\tSpectrogram 1\t1\t0.5\t1.5\t100\t2000\tdog\r\n"
    assert ann.parse_annotations(raven) == [Annotation(0.5, 1.5, "dog", 100.0, 2000.0)]


def test_empty_file_has_no_annotations(tmp_path):
    path = tmp_path / "quiet.txt"
    path.write_text("\n  \n")
    assert ann.read_annotations(str(path)) == []


def test_raven_views_of_one_selection_count_once():
    text = (
        RAVEN_HEADER + "\tNotes\n"
        "1\tWaveform 1\t1\t1.0\t2.0\t\t\tdog\tx\n"
        "1\tSpectrogram 1\t1\t1.0\t2.0\t150.5\t3000\tdog\tx\n"
        "2\tWaveform 1\t1\t4.0\t4.0\t0\t22050\tcat\n"  # trailing tab stripped by an editor
        "2\tSpectrogram 1\t1\t4.0\t4.0\t0\t22050\tcat\t\n"
        "3\tSpectrogram 1\t1\t5\t6.5\t0\t1000\t\n"
    )
    assert ann.detect_format(text) == "raven"
    assert ann.parse_annotations(text) == [
        Annotation(1.0, 2.0, "dog", 150.5, 3000.0),  # the band from the row that has one
        Annotation(4.0, 4.0, "cat", 0.0, 22050.0),
        Annotation(5.0, 6.5, "", 0.0, 1000.0),
    ]


def test_raven_label_column_is_the_first_present_of_the_list():
    text = "Begin Time (s)\tEnd Time (s)\tClass\tAnnotation\n0\t1\tbird\tchiffchaff\n"
    assert ann.parse_annotations(text) == [Annotation(0.0, 1.0, "chiffchaff")]
    assert ann.parse_annotations(text, label_columns=("Class",)) == [Annotation(0.0, 1.0, "bird")]
    # without a Selection column every row is a selection of its own
    two = "Begin Time (s)\tEnd Time (s)\tLabel\n0\t1\ta\n0\t1\ta\n"
    assert len(ann.parse_annotations(two)) == 2


def _error(text: str, **kwargs) -> str:
    with pytest.raises(AnnotationError) as info:
        ann.parse_annotations(text, source="refs/night1.txt", **kwargs)
    assert isinstance(info.value, ConfigError)  # the CLI reports it as a bad input (exit 2)
    return str(info.value)


@pytest.mark.parametrize(
    "text, where, what",
    [
        ("0\t1\ta\nzero\t1\tb\n", "refs/night1.txt:2", "start 'zero' is not a number"),
        ("0\t1\ta\n\n2\tx\tb\n", "refs/night1.txt:3", "end 'x' is not a number"),
        ("3\t2\ta\n", "refs/night1.txt:1", "end 2 s is before start 3 s"),
        ("-1\t2\ta\n", "refs/night1.txt:1", "start -1 s is negative"),
        ("0\t1\ta\n0 1 b\n", "refs/night1.txt:2", "expected tab-separated"),
        ("nan\t1\ta\n", "refs/night1.txt:1", "not a finite number"),
        ("\\\t100\t200\n", "refs/night1.txt:1", "spectral selection line before any label"),
        ("0\t1\ta\n\\\t100\n", "refs/night1.txt:2", "is not '\\<TAB>low_hz<TAB>high_hz'"),
        ("0\t1\ta\n\\\t500\t100\n", "refs/night1.txt:2", "high frequency 100 Hz is below low 500 Hz"),
    ],
)
def test_malformed_audacity_lines_name_file_and_line(text, where, what):
    message = _error(text)
    assert message.startswith(where + ":") and what in message


@pytest.mark.parametrize(
    "text, where, what",
    [
        ("Selection\tBegin Time (s)\tAnnotation\n1\t0\ta\n", ":1:", "lacks column(s) ['End Time (s)']"),
        ("Selection\tBegin Time (s)\tEnd Time (s)\tNotes\n1\t0\t1\tx\n", ":1:", "no label column"),
        (RAVEN_HEADER + "\n1\tS\t1\t0.5\tabc\t0\t1\tdog\n", ":2:", "End Time (s) 'abc' is not a number"),
        (RAVEN_HEADER + "\n\n1\tS\t1\t2\t1\t0\t1\tdog\n", ":3:", "end 1 s is before start 2 s"),
        (RAVEN_HEADER + "\n1\tS\t1\t-0.5\t1\t0\t1\tdog\n", ":2:", "Begin Time (s) -0.5 s is negative"),
        (RAVEN_HEADER + "\n1\tS\t1\t\t1\t0\t1\tdog\n", ":2:", "Begin Time (s) '' is not a number"),
        (RAVEN_HEADER + "\n1\tS\t1\t0\t1\tlow\t1\tdog\n", ":2:", "Low Freq (Hz) 'low' is not a number"),
        (
            RAVEN_HEADER + "\n1\tW\t1\t0\t1\t0\t1\tdog\n1\tS\t1\t0\t1.5\t0\t1\tdog\n",
            ":3:",
            "selection 1 spans 0-1.5 s here but 0-1 s on line 2",
        ),
    ],
)
def test_malformed_raven_tables_name_file_and_line(text, where, what):
    message = _error(text)
    assert message.startswith("refs/night1.txt" + where) and what in message


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(AnnotationError, match="does not exist"):
        ann.read_annotations(str(tmp_path / "missing.txt"))
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"0\t1\tok\n1\t2\tM\xfcller\n")
    with pytest.raises(AnnotationError, match=r"latin\.txt:2: not UTF-8"):
        ann.read_annotations(str(latin))
    bad = tmp_path / "bad.Table.1.selections.txt"
    bad.write_text(RAVEN_HEADER + "\n1\tS\t1\t5\t4\t0\t1\tdog\n")
    with pytest.raises(AnnotationError, match=r"bad\.Table\.1\.selections\.txt:2: end 4 s is before"):
        ann.read_annotations(str(bad))


def test_annotation_stem():
    assert ann.annotation_stem("a/b/night1.Table.1.selections.txt") == "night1"
    assert ann.annotation_stem("night1.Table.2.selections.txt") == "night1"
    assert ann.annotation_stem("gs://bucket/x/night1.selections.txt") == "night1"
    assert ann.annotation_stem("night1.txt") == "night1"
    assert ann.annotation_stem("20261124_005945.wav.txt") == "20261124_005945.wav"
    assert ann.annotation_stem("night1.flac") is None
    assert ann.annotation_stem(".txt") is None


def test_find_annotation_by_stem(tmp_path):
    audio = tmp_path / "site1" / "night1.flac"
    audio.parent.mkdir()
    audio.write_bytes(b"")
    assert ann.find_annotation(str(audio)) is None
    (tmp_path / "site1" / "night1.txt").write_text("0\t1\tdog\n")
    (tmp_path / "site1" / "night2.Table.1.selections.txt").write_text(RAVEN_HEADER + "\n")
    assert ann.find_annotation(str(audio)) == str(tmp_path / "site1" / "night1.txt")
    assert ann.find_annotation(str(tmp_path / "site1" / "night2.wav")) == str(
        tmp_path / "site1" / "night2.Table.1.selections.txt"
    )
    (tmp_path / "site1" / "night1.selections.txt").write_text(RAVEN_HEADER + "\n")
    with pytest.raises(AnnotationError, match="several annotation files"):
        ann.find_annotation(str(audio))


def test_annotation_files_of_a_folder(tmp_path):
    (tmp_path / "site1").mkdir()
    (tmp_path / "site1" / "night1.txt").write_text("0\t1\tdog\n")
    (tmp_path / "site1" / "night1.flac").write_bytes(b"")  # audio beside its labels is skipped
    (tmp_path / "night2.Table.1.selections.txt").write_text(RAVEN_HEADER + "\n")
    assert ann.annotation_files(str(tmp_path)) == {
        "night2": str(tmp_path / "night2.Table.1.selections.txt"),
        "site1/night1": str(tmp_path / "site1" / "night1.txt"),
    }
    (tmp_path / "night2.txt").write_text("")
    with pytest.raises(AnnotationError, match="are both for recording 'night2'"):
        ann.annotation_files(str(tmp_path))
