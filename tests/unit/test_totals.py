"""A run's totals: tallies per recording combined into the figures dataset.json and run.json give."""

from __future__ import annotations

from soundshard.schemas.records import DeadLetter, FileSummary, LabelCount
from soundshard.transforms.outputs import totals


def _summary(clip, unit=0, n_units=1, *, label="dog", fold=1, windows=10, seconds=5.0, silent=False, **kw):
    return FileSummary(
        clip, f"/in/{clip}.wav", label, fold, None, windows, seconds, silent, unit, n_units, **kw
    )


def _dead(clip, stage="decode", reason="unreadable_audio", **kw):
    return DeadLetter(f"/in/{clip}.wav", clip, stage, reason, "ValueError", "bad", **kw)


# Six inputs: a whole clip, a silent one, a long recording of three units (one failed), one
# whose only unit failed, a bad manifest row, a strongly labelled recording, and an offline copy
# of the first clip (not an input); one more copy failed.
SUMMARIES = [
    _summary("a", windows=10, seconds=5.0),
    _summary("silent", label="rain", fold=2, windows=4, seconds=2.0, silent=True),
    _summary("long", 0, 3, label=None, fold=None, windows=100, seconds=60.0),
    _summary("long", 2, 3, label=None, fold=None, windows=50, seconds=30.0),
    _summary("strong", label=None, fold=3, windows=20, seconds=10.0),
    _summary("a#pitch", windows=10, seconds=5.0, augmented=True),
]
DEAD = [
    _dead("long", stage="features", reason="features_failed"),
    _dead("broken"),
    DeadLetter("/in/meta.csv:7", None, "manifest", "bad_manifest_row", "ValueError", "row 7"),
    _dead("a#gain", reason="augment_failed", augmentation="gain"),
]
LABELS = [
    LabelCount("strong", False, 12, (("<background>", 8), ("dog", 4)), 0),
    LabelCount("strong", False, 8, (("<background>", 2), ("dog", 3), ("rain", 4)), 1),
]


def test_totals_by_hand():
    out = totals.summarize(SUMMARIES, DEAD, n_inputs=6, label_counts=LABELS)
    figures = out["figures"]
    assert figures == {
        "inputs": 6,
        "files_processed": 3,  # a, silent, strong
        "dead_letters": 4,
        "dead_letter_inputs": 3,  # long (a unit failed), broken, the manifest row
        "partial_files": 1,  # long: two units' windows written
        "augmented_copies": 1,
        "augmented_copies_failed": 1,
        "dead_letters_by_reason": {
            "augment_failed": 1,
            "bad_manifest_row": 1,
            "features_failed": 1,
            "unreadable_audio": 1,
        },
        "accounted_for": True,  # 3 + 3 == 6 inputs (the copies are not inputs)
        "work_units": 6,
        "windows": 194,
        "audio_s": 112.0,
        "digital_silence_files": 1,
    }
    counts = out["counts"]
    # the strong recording counts its windows per window label, and once per label it has
    assert counts["windows_by_label"] == {"<background>": 10, "<none>": 150, "dog": 27, "rain": 8}
    assert counts["clips_by_label"] == {"<none>": 1, "dog": 3, "rain": 2}
    assert counts["clips_by_fold"] == {"1": 2, "2": 1, "3": 1, "<none>": 1}
    assert counts["windows_by_fold"] == {"1": 20, "2": 4, "3": 20, "<none>": 150}
    assert counts["strong_labels"] == {
        "recordings": 1,
        "windows": 20,
        "background_windows": 10,
        "multi_label_windows": 1,
    }


def test_tallies_merge_in_any_grouping():
    # a combine may add inputs to several accumulators and merge them in any order
    elements = [*SUMMARIES, *DEAD, *LABELS]
    whole = totals.summarize(SUMMARIES, DEAD, n_inputs=6, label_counts=LABELS)
    fn = totals.TallyFn()
    for split in (1, 3, 7):
        by_clip: dict = {}
        for k, element in enumerate(elements):
            part = by_clip.setdefault(totals.clip_key(element), [fn.create_accumulator() for _ in range(2)])
            fn.add_input(part[k % 2 if split > 1 else 0], element)
        tallies = [fn.extract_output(fn.merge_accumulators(reversed(parts))) for parts in by_clip.values()]
        combine = totals.TotalsFn(6)
        halves = [combine.create_accumulator(), combine.create_accumulator()]
        for k, tally in enumerate(tallies):
            combine.add_input(halves[(k // split) % 2], tally)
        assert combine.extract_output(combine.merge_accumulators(halves)) == whole


def test_ledger_outcomes_come_from_the_tallies():
    tallies = totals.tally([*SUMMARIES, *DEAD])
    assert (tallies["long"].n_windows, tallies["long"].reason) == (150, "features_failed")  # partial
    assert (tallies["broken"].n_windows, tallies["broken"].reason) == (0, "unreadable_audio")
    assert (tallies["a"].n_windows, tallies["a"].reason) == (10, None)
    assert sorted(tallies["long"].units) == [0, 2]
