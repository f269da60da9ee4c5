"""Event rules set on annotated validation recordings: matching, counts against sed_eval, choices."""

import itertools
import json

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from soundshard.pipelines import features, train
from soundshard.schemas.tagging import TagConfig
from soundshard.transforms.tagging import calibration, events, scoring

from ..helpers import write_audio

LABELS = ("a", "b")


def config(**rules) -> TagConfig:
    values = dict(
        label_names=LABELS,
        window_thresholds=(0.8, 0.8),
        file_thresholds=(0.5, 0.5),
        median_filter_windows=1,
        min_level_above_floor_db=None,
    )
    return TagConfig(**{**values, **rules})


def recording(scores, truth, *, hop_s=0.5, window_s=1.0, level_db=None, name="r") -> calibration.Recording:
    n = len(scores)
    start = np.arange(n) * hop_s
    return calibration.Recording(
        clip_id=name,
        scores=np.asarray(scores, np.float32),
        truth=np.asarray(truth, np.float32),
        window_index=np.arange(n),
        start_s=start,
        end_s=start + window_s,
        level_db=None if level_db is None else np.asarray(level_db, float),
    )


def test_greedy_matching_is_the_largest_matching():
    rng = np.random.default_rng(1)
    for _ in range(200):
        ref = np.round(rng.uniform(0, 10, rng.integers(0, 8)), 1)
        est = np.round(rng.uniform(0, 10, rng.integers(0, 8)), 1)
        close = np.abs(ref[:, None] - est[None, :]) <= 0.5 + 1e-9
        if close.size:
            rows, cols = linear_sum_assignment(close, maximize=True)
            best = int(close[rows, cols].sum())
        else:
            best = 0
        assert calibration.matched(ref, est) == best
    assert calibration.matched([1.0, 1.2], [1.6]) == 1  # each onset once
    assert calibration.matched([1.0], [1.51]) == 0


def test_reference_events_are_runs_of_labelled_windows():
    truth = np.zeros((12, 2))
    truth[2:5, 0] = 1
    truth[6, 0] = 1
    truth[3:9, 1] = 1
    rec = recording(np.zeros((12, 2)), truth)
    # cells: window k spans [0.5 k + 0.25, 0.5 k + 0.75] inside the grid
    assert rec.reference(0) == [(1.25, 2.75), (3.25, 3.75)]
    assert rec.reference(1) == [(1.75, 4.75)]


def test_counts_agree_with_sed_eval():
    rng = np.random.default_rng(7)
    n = 240  # two minutes at a 0.5 s hop
    truth = np.zeros((n, 2))
    for c, starts in enumerate(([10, 60, 150], [30, 100, 200])):
        for s in starts:
            truth[s : s + rng.integers(3, 12), c] = 1
    scores = np.clip(truth * 0.85 + rng.normal(0, 0.12, truth.shape), 0, 1)
    rec = recording(scores, truth)
    for rules in ({}, {"median_filter_windows": 3, "hysteresis": 0.3}, {"max_gap_s": 2.0}):
        cfg = config(**rules)
        got = calibration.counts([rec], cfg)
        found = events.find_events(
            rec.scores,
            start_s=rec.start_s,
            end_s=rec.end_s,
            window_index=rec.window_index,
            config=cfg,
            duration_s=rec.duration_s,
        )
        reference = tuple((a, b, label) for c, label in enumerate(LABELS) for a, b in rec.reference(c))
        estimated = tuple((e.start_s, e.end_s, e.label) for e in found)
        sed = scoring.sed_metrics(
            [scoring.Recording("r", rec.duration_s, reference, estimated)], labels=LABELS
        )
        total = got.sum(axis=0)
        segment_f1, event_f1 = calibration.overall(got)
        assert event_f1 == pytest.approx(sed["event"]["overall"]["f1"], abs=1e-9)
        assert segment_f1 == pytest.approx(sed["segment"]["overall"]["f1"], abs=1e-9)
        assert total[0, 1] == sed["event"]["overall"]["n_reference"]
        assert total[0, 2] == sed["event"]["overall"]["n_estimated"]


def dipping_events(n=200, seed=0):
    """Events of ten windows whose scores sag below the threshold for three windows in the middle
    (a model unsure inside a long sound), over low scores elsewhere."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((n, 2))
    scores = rng.uniform(0.0, 0.2, (n, 2))
    for s in range(10, n - 20, 30):
        truth[s : s + 10, 0] = 1
        scores[s : s + 10, 0] = 0.9
        scores[s + 4 : s + 7, 0] = 0.55
    return scores, truth


def test_hysteresis_is_chosen_where_scores_sag_inside_sounds():
    scores, truth = dipping_events()
    result = calibration.calibrate(
        [recording(scores, truth)], config(), grid={"hysteresis": (0.1, 0.2, 0.3, 0.4)}
    )
    # 0.8 - 0.3 = 0.5 holds the sagging windows: one event per sound; 0.4 holds too, 0.3 comes first
    assert result["rules"] == {"hysteresis": 0.3}
    assert result["event_f1"] == 1.0 and result["segment_f1"] == 1.0
    assert result["tried"] == 4 and result["recordings"] == 1
    assert result["per_class"]["a"]["reference"] == 6 and result["per_class"]["b"]["reference"] == 0
    fragmented = calibration.counts([recording(scores, truth)], config(hysteresis=0.1))
    assert fragmented[0, 0].tolist() == [6, 6, 12]  # each sound reported twice


def test_median_is_chosen_against_one_window_blips():
    scores, truth = dipping_events(seed=1)
    scores[:, 0] = np.where(truth[:, 0] > 0, 0.9, scores[:, 0])
    blips = [5, 45, 77, 133, 168]
    scores[blips, 1] = 0.95  # class b, never in the reference
    result = calibration.calibrate(
        [recording(scores, truth)], config(), grid={"median_filter_windows": (1, 3, 5)}
    )
    assert result["rules"] == {"median_filter_windows": 3}
    assert result["event_f1"] == 1.0


def test_floor_gate_is_chosen_against_quiet_false_alarms():
    n = 300
    scores, truth = np.zeros((n, 2)), np.zeros((n, 2))
    level = np.full(n, -40.0)
    for s in (20, 120, 220):  # sounds, 20 dB above the bed
        truth[s : s + 6, 0] = scores[s : s + 6, 0] = 1.0
        level[s : s + 6] = -20.0
    for s in (70, 170, 270):  # the model hears "a" in the bed itself
        scores[s : s + 4, 0] = 0.9
        level[s : s + 4] = -39.0
    rec = recording(scores * 0.95, truth, level_db=level)
    grid = {"min_level_above_floor_db": (None, 3.0, 6.0)}
    result = calibration.calibrate([rec], config(), grid=grid)
    assert result["rules"] == {"min_level_above_floor_db": 3.0}
    assert result["event_f1"] == 1.0
    assert calibration.counts([rec], config())[0, 0].tolist() == [3, 3, 6]


def test_full_grid_and_ties_take_the_lightest_rules():
    scores, truth = dipping_events(seed=2)
    scores[:, 0] = np.where(truth[:, 0] > 0, 0.9, 0.05)  # clean: every rule is perfect
    result = calibration.calibrate([recording(scores, truth)], config())
    assert result["tried"] == int(np.prod([len(v) for v in calibration.GRID.values()]))
    assert result["rules"] == {k: v[0] for k, v in calibration.GRID.items()}
    assert result["score"] == 1.0


def test_recordings_split_and_sort_windows_by_clip():
    times = np.array([[1, 0.5, 1.5], [0, 0.0, 1.0], [0, 0.0, 1.0], [1, 0.5, 1.5]], float)
    scores = np.arange(8, dtype=np.float32).reshape(4, 2)
    recs = calibration.recordings(
        scores, np.zeros((4, 2)), clip_ids=np.array(["y", "y", "x", "x"], object), times=times
    )
    assert [r.clip_id for r in recs] == ["x", "y"]
    np.testing.assert_array_equal(recs[1].scores, scores[[1, 0]])  # by window index
    np.testing.assert_array_equal(recs[0].window_index, [0, 1])
    assert recs[0].duration_s == 1.5
    assert list(itertools.chain.from_iterable(r.start_s for r in recs)) == [0.0, 0.5, 0.0, 0.5]


@pytest.mark.slow
def test_train_sets_event_rules_on_annotated_validation_recordings(tmp_path):
    rate = 22050
    rng = np.random.default_rng(5)
    rows = ["filename,fold"]
    for k, fold in enumerate([1, 1, 2, 3]):
        y = 0.01 * rng.standard_normal(rate * 40).astype(np.float32)  # a 40 s bed of noise
        t = np.arange(rate) / rate
        lines = []
        for j, start in enumerate(range(3 + k, 36, 6)):  # tones and chirps, a second each
            label = "tone" if j % 2 == 0 else "chirp"
            f = 1000.0 if label == "tone" else 500.0 + 2500.0 * t
            y[start * rate : (start + 1) * rate] += 0.3 * np.sin(2 * np.pi * f * t).astype(np.float32)
            lines.append(f"{start}\t{start + 1}\t{label}")
        write_audio(tmp_path / "site" / f"rec{k}.wav", y, rate)
        (tmp_path / "site" / f"rec{k}.txt").write_text("\n".join(lines) + "\n")
        rows.append(f"rec{k}.wav,{fold}")
    (tmp_path / "meta.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "f"
    argv = ["--input", tmp_path / "site", "--manifest", tmp_path / "meta.csv", "--labels"]
    assert features.run([str(a) for a in [*argv, "--output", out, "--format", "parquet"]]) == 0
    model = tmp_path / "m"
    argv = ["--features", out, "--arch", "edgecnn", "--test-fold", "3", "--validation-fold", "2"]
    argv += ["--epochs", "3", "--batch-size", "16", "--output", model, "--quiet"]
    assert train.run([str(a) for a in argv]) == 0
    description = json.loads((model / "model.json").read_text())
    metrics = json.loads((model / "metrics.json").read_text())
    rules = description["postprocessing"]
    assert rules["from"] == "best mean of segment and event F1 on 1 annotated validation recording(s)"
    for name, values in calibration.GRID.items():
        assert rules[name] in values and metrics["event_rules"]["rules"][name] == rules[name]
    assert metrics["event_rules"]["tried"] == 256 and metrics["event_rules"]["recordings"] == 1
    assert metrics["event_rules"]["per_class"]["tone"]["reference"] == 3
    assert set(metrics["strong_test_events"]) == {"recordings", "segment_f1", "event_f1"}
    assert metrics["strong_test_events"]["recordings"] == 1
    # a rule given to train is kept, the others still searched
    fixed = tmp_path / "m3"
    argv[argv.index(model)] = fixed
    assert train.run([str(a) for a in [*argv, "--median-filter-windows", "5"]]) == 0
    description = json.loads((fixed / "model.json").read_text())
    assert description["postprocessing"]["median_filter_windows"] == 5
