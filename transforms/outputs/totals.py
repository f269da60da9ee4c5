"""A run's figures and counts, aggregated by combines (no list of every unit in one place).

Every work unit's :class:`FileSummary`, every :class:`DeadLetter` and every strong-label
:class:`LabelCount` is first reduced per recording to a :class:`ClipTally` (``CombinePerKey``),
then the tallies to the run's totals (``CombineGlobally``): the commit takes one small dict as a
side input however many recordings the night held. :func:`summarize` applies the same two steps
in one process.

A recording counts as processed when none of its units failed; one with a failed unit counts as
dead-lettered (its other units' windows are still written: ``partial_files``). So
``files_processed + dead_letter_inputs == inputs``. Offline-augmented copies are not inputs: they
are counted apart (``augmented_copies``, ``augmented_copies_failed``) and their windows are in the
counts per label and fold.

Strongly labelled recordings (those with label counts) count their windows per window label
instead of per clip label: ``windows_by_label`` counts a window under each of its labels and
``<background>`` for windows without any; ``clips_by_label`` counts such a recording once under
each label its windows have (``<background>`` when none has one); ``strong_labels`` gives the
strongly labelled recordings (offline copies not included), and their windows, background windows
and windows with several labels (copies included, as in the other window counts).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable
from typing import NamedTuple

import apache_beam as beam

from soundshard.schemas.records import DeadLetter, FileSummary, LabelCount
from soundshard.transforms.labels import strong_labels

#: Stages that fail one work unit of a recording (other units of it may succeed).
UNIT_STAGES = ("decode", "features", "embed", "tag")
#: Key of the dead letters that name no recording (a listing or manifest failure).
NO_CLIP = ""


@dataclasses.dataclass
class ClipTally:
    """What one recording (or offline copy) contributed to the run.

    Attributes:
        summarized: At least one of its units was processed.
        label, fold, split: Its clip label, fold and split (from a unit's summary).
        n_windows: Windows written, over all its units.
        audio_s: Seconds of audio its units account for.
        units: Indices of its processed units.
        all_silent: Every processed unit was digital silence.
        augmented: An offline-augmented copy.
        unit_failed: An input's unit failed (decode, features, embed or tag).
        copy_failed: An offline copy of it failed.
        other_dead: Dead letters of it at other stages (source, manifest, ...).
        reasons: Dead letters per reason.
        strong: Strong-label windows per label (``<background>`` for none).
        strong_windows: Windows with strong labels.
        strong_multi: Windows with several labels.
        labelled: It has strong labels (label counts came for it).
        strong_input: Strong labels came with a recording that is not an offline copy.
    """

    summarized: bool = False
    label: str | None = None
    fold: int | None = None
    split: str | None = None
    n_windows: int = 0
    audio_s: float = 0.0
    units: set[int] = dataclasses.field(default_factory=set)
    all_silent: bool = True
    augmented: bool = False
    unit_failed: bool = False
    copy_failed: bool = False
    other_dead: int = 0
    reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    strong: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    strong_windows: int = 0
    strong_multi: int = 0
    labelled: bool = False
    strong_input: bool = False

    def add(self, element: FileSummary | DeadLetter | LabelCount) -> ClipTally:
        if isinstance(element, FileSummary):
            if not self.summarized:
                self.label, self.fold, self.split = element.label, element.fold, element.split
            self.summarized = True
            self.n_windows += element.n_windows
            self.audio_s += element.duration_s
            self.units.add(element.unit_index)
            self.all_silent = self.all_silent and element.silent
            self.augmented = self.augmented or element.augmented
        elif isinstance(element, DeadLetter):
            self.reasons[element.reason] += 1
            if element.augmentation is not None:
                self.copy_failed = True
            elif element.stage in UNIT_STAGES and element.clip_id is not None:
                self.unit_failed = True
            else:
                self.other_dead += 1
        elif isinstance(element, LabelCount):
            self.strong.update(dict(element.by_label))
            self.strong_windows += element.n_windows
            self.strong_multi += element.multi_label
            self.labelled = True
            self.strong_input = self.strong_input or not element.augmented
        else:
            raise TypeError(f"cannot tally a {type(element).__name__}")
        return self

    def merge(self, other: ClipTally) -> ClipTally:
        if other.summarized and not self.summarized:
            self.label, self.fold, self.split = other.label, other.fold, other.split
        self.summarized = self.summarized or other.summarized
        self.n_windows += other.n_windows
        self.audio_s += other.audio_s
        self.units |= other.units
        self.all_silent = self.all_silent and other.all_silent
        self.augmented = self.augmented or other.augmented
        self.unit_failed = self.unit_failed or other.unit_failed
        self.copy_failed = self.copy_failed or other.copy_failed
        self.other_dead += other.other_dead
        self.reasons.update(other.reasons)
        self.strong.update(other.strong)
        self.strong_windows += other.strong_windows
        self.strong_multi += other.strong_multi
        self.labelled = self.labelled or other.labelled
        self.strong_input = self.strong_input or other.strong_input
        return self

    @property
    def reason(self) -> str | None:
        """The reason a ledger records for it (the first in name order), ``None`` if it had no
        dead letter."""
        return min(self.reasons) if self.reasons else None


class _Merging(beam.CombineFn):
    """A CombineFn whose accumulators add an input and merge another themselves."""

    def add_input(self, accumulator, element):
        return accumulator.add(element)

    def merge_accumulators(self, accumulators):
        accumulators = iter(accumulators)
        out = next(accumulators)
        for other in accumulators:
            out.merge(other)
        return out


class TallyFn(_Merging):
    """Combines a recording's summaries, dead letters and label counts into its ClipTally."""

    def create_accumulator(self):
        return ClipTally()

    def extract_output(self, tally):
        return tally


class _Totals:
    """Counters over recordings (the accumulator of :class:`TotalsFn`)."""

    def __init__(self):
        self.counts = {
            name: collections.Counter()
            for name in (
                "clips_by_label",
                "windows_by_label",
                "clips_by_fold",
                "windows_by_fold",
                "clips_by_split",
                "dead_letters_by_reason",
            )
        }
        self.figures = collections.Counter()
        self.audio_s = 0.0

    def add(self, tally: ClipTally) -> _Totals:
        c, f = self.counts, self.figures
        c["dead_letters_by_reason"].update(tally.reasons)
        f["dead_letters"] += sum(tally.reasons.values())
        f["dead_letter_inputs"] += tally.other_dead + int(tally.unit_failed)
        f["augmented_copies_failed"] += int(tally.copy_failed)
        if tally.labelled:
            f["strong_recordings"] += int(tally.strong_input)
            f["strong_windows"] += tally.strong_windows
            f["strong_background"] += tally.strong.get(strong_labels.BACKGROUND, 0)
            f["strong_multi"] += tally.strong_multi
        if not tally.summarized:
            return self
        label = tally.label if tally.label is not None else "<none>"
        fold = str(tally.fold) if tally.fold is not None else "<none>"
        if tally.labelled:
            c["windows_by_label"].update(tally.strong)
            named = set(tally.strong) - {strong_labels.BACKGROUND}
            c["clips_by_label"].update(named or {strong_labels.BACKGROUND})
        else:
            c["windows_by_label"][label] += tally.n_windows
            c["clips_by_label"][label] += 1
        c["windows_by_fold"][fold] += tally.n_windows
        c["clips_by_fold"][fold] += 1
        if tally.split is not None:
            c["clips_by_split"][tally.split] += 1
        f["files_processed"] += int(not tally.unit_failed and not tally.augmented)
        f["partial_files"] += int(tally.unit_failed)
        f["augmented_copies"] += int(tally.augmented and not tally.copy_failed)
        f["work_units"] += len(tally.units)
        f["windows"] += tally.n_windows
        f["digital_silence_files"] += int(tally.all_silent)
        self.audio_s += tally.audio_s
        return self

    def merge(self, other: _Totals) -> _Totals:
        for name, counter in other.counts.items():
            self.counts[name].update(counter)
        self.figures.update(other.figures)
        self.audio_s += other.audio_s
        return self

    def result(self, n_inputs: int) -> dict:
        c, f = self.counts, self.figures
        return {
            "counts": {
                **{k: dict(sorted(c[k].items())) for k in c if k != "dead_letters_by_reason"},
                "strong_labels": {
                    "recordings": f["strong_recordings"],
                    "windows": f["strong_windows"],
                    "background_windows": f["strong_background"],
                    "multi_label_windows": f["strong_multi"],
                },
            },
            "figures": {
                "inputs": n_inputs,
                "files_processed": f["files_processed"],
                "dead_letters": f["dead_letters"],
                "dead_letter_inputs": f["dead_letter_inputs"],
                "partial_files": f["partial_files"],
                "augmented_copies": f["augmented_copies"],
                "augmented_copies_failed": f["augmented_copies_failed"],
                "dead_letters_by_reason": dict(sorted(c["dead_letters_by_reason"].items())),
                "accounted_for": f["files_processed"] + f["dead_letter_inputs"] == n_inputs,
                "work_units": f["work_units"],
                "windows": f["windows"],
                "audio_s": round(self.audio_s, 3),
                "digital_silence_files": f["digital_silence_files"],
            },
        }


class TotalsFn(_Merging):
    """Combines ClipTallies into the run's ``{"counts": ..., "figures": ...}`` (as ``dataset.json``
    and ``run.json`` carry them); with no input, the totals of an empty run."""

    def __init__(self, n_inputs: int):
        self._n_inputs = n_inputs

    def create_accumulator(self):
        return _Totals()

    def extract_output(self, totals):
        return totals.result(self._n_inputs)


def clip_key(element: FileSummary | DeadLetter | LabelCount) -> str:
    """The recording an element is tallied under (``NO_CLIP`` for dead letters naming none)."""
    return element.clip_id if element.clip_id is not None else NO_CLIP


class Tallied(NamedTuple):
    """The outputs of :class:`RunTotals`.

    Attributes:
        tallies: ``(clip_id, ClipTally)``, one per recording.
        totals: One dict: the run's counts and figures (:func:`summarize`'s).
    """

    tallies: beam.PCollection[tuple[str, ClipTally]]
    totals: beam.PCollection[dict]


class RunTotals(beam.PTransform[tuple[beam.PCollection, ...], Tallied]):
    """Summaries, dead letters and (optionally) label counts → per recording and whole-run totals
    (:class:`Tallied`).

    Applied to a tuple of PCollections (of FileSummary, DeadLetter[, LabelCount]).
    """

    def __init__(self, n_inputs: int):
        super().__init__()
        self._n_inputs = n_inputs

    def expand(self, pcolls: tuple[beam.PCollection, ...]):
        tallies = (
            pcolls
            | "Flatten" >> beam.Flatten()
            | "ByRecording" >> beam.WithKeys(clip_key)
            | "TallyRecordings" >> beam.CombinePerKey(TallyFn())
        )
        totals = (
            tallies | "Tallies" >> beam.Values() | "Totals" >> beam.CombineGlobally(TotalsFn(self._n_inputs))
        )
        return Tallied(tallies=tallies, totals=totals)


def tally(elements: Iterable[FileSummary | DeadLetter | LabelCount]) -> dict[str, ClipTally]:
    """Per recording, its ClipTally (in one process)."""
    out: dict[str, ClipTally] = collections.defaultdict(ClipTally)
    for element in elements:
        out[clip_key(element)].add(element)
    return dict(out)


def summarize(
    summaries: Iterable[FileSummary],
    dead_letters: Iterable[DeadLetter],
    *,
    n_inputs: int,
    label_counts: Iterable[LabelCount] = (),
) -> dict:
    """Counts per label, fold and split and the run's figures, in one process: what
    :class:`RunTotals` gives in a pipeline."""
    totals = _Totals()
    for clip in tally([*summaries, *dead_letters, *label_counts]).values():
        totals.add(clip)
    return totals.result(n_inputs)
