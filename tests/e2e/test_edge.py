"""compile-edge: int8 quantisation, TFLite Micro vs LiteRT, artifact contents, C sources, feature
parity, budgets and refusals, on a small edge CNN trained on the demo set."""

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from soundshard.pipelines import compile_edge, features, train
from soundshard.schemas import edge as edge_schema
from soundshard.schemas.config import FeatureConfig
from soundshard.schemas.errors import ConfigError
from soundshard.transforms.edge import artifact as edge
from soundshard.transforms.edge import cexport
from soundshard.transforms.features import melspec
from soundshard.transforms.levels import meter as levels
from soundshard.transforms.models import architectures as models
from soundshard.transforms.models import training

from ..helpers import reseal_model_folder

#: One of the demo's 8 held-out clips, in percentage points.
ONE_CLIP_PP = 12.5
#: Feature parity: the step-by-step reference (float64) against the training features (float32
#: scipy, vectorised), in dB; and the C version (float32 window and weights, double DFT).
PARITY_TOLERANCE_DB = 0.01
C_PARITY_TOLERANCE_DB = 0.01
#: LAeq of a golden window: the header's float32 A-weighting sections with float state against
#: the levels stage's float64 filter (the float32 rounding of the poles near 20 Hz moves low
#: tones by ~1e-3 dB).
C_LAEQ_TOLERANCE_DB = 0.01


@pytest.fixture(scope="module")
def edge_model(demo_features, tmp_path_factory):
    """An edgecnn trained on demo folds 3-4 (fold 2 validates, fold 1 is held out)."""
    folder = tmp_path_factory.mktemp("edge") / "model"
    argv = ["--features", demo_features, "--arch", "edgecnn", "--test-fold", 1, "--output", folder]
    argv += ["--epochs", 20, "--patience", 20, "--batch-size", 16, "--quiet"]
    assert train.run([str(a) for a in argv]) == 0
    return folder


@pytest.fixture(scope="module")
def artifact(edge_model, demo_features):
    out = edge_model.parent / "edge"
    argv = [
        "--model-dir",
        edge_model,
        "--features",
        demo_features,
        "--target",
        "cortex-m4-256k",
        "--output",
        out,
    ]
    argv += ["--max-accuracy-drop", ONE_CLIP_PP, "--quiet"]
    assert compile_edge.run([str(a) for a in argv]) == 0
    return out


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_artifact_contents_and_manifest(artifact, edge_model, demo_features):
    names = {p.relative_to(artifact).as_posix() for p in artifact.rglob("*") if p.is_file()}
    assert names == {
        "model_int8.tflite",
        "model_data.h",
        "model_data.cc",
        "model_data.c",
        "soundshard_features.h",
        "golden_vectors.h",
        "golden_vectors.c",
        "golden/audio.npy",
        "golden/features.npy",
        "golden/input_int8.npy",
        "golden/output_int8.npy",
        "golden/labels.npy",
        "manifest.json",
        "report.json",
        "report.md",
    }
    m = manifest_of(artifact)
    flatbuffer = (artifact / "model_int8.tflite").read_bytes()
    assert flatbuffer[4:8] == b"TFL3"
    assert m["model_sha256"] == hashlib.sha256(flatbuffer).hexdigest() and m["model_bytes"] == len(flatbuffer)
    description = json.loads((edge_model / "model.json").read_text())
    dataset = json.loads((demo_features / "dataset.json").read_text())
    assert m["feature_fingerprint"] == description["feature_fingerprint"] == dataset["feature_fingerprint"]
    assert FeatureConfig.from_dict(m["feature_config"]).fingerprint == m["feature_fingerprint"]
    assert m["labels"] == description["label_names"] == ["chirp", "click_train", "hum", "noise_burst"]
    assert m["input"]["shape"] == [1, 60, 41] and m["input"]["dtype"] == "int8"
    assert m["output"]["shape"] == [1, 4] and m["output"]["dtype"] == "int8"
    # softmax output: TFLite's fixed int8 quantisation of [0, 1]
    assert m["output"]["scale"] == pytest.approx(1 / 256) and m["output"]["zero_point"] == -128
    assert m["input"]["scale"] > 0 and -128 <= m["input"]["zero_point"] <= 127
    assert set(m["tensor_types"]) <= {"INT8", "INT32"}
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "SOFTMAX"} <= set(m["ops"])
    assert sum(m["op_counts"].values()) >= 9  # stem + 3 × (depthwise + pointwise) + dense + softmax
    # the representative set is drawn from the training folds only
    rep = m["quantization"]["representative"]
    assert rep["by"] == "fold" and rep["folds"] == description["split"]["train_folds"] == [3, 4]
    assert 0 < rep["n_windows"] <= rep["n_available"] == 96  # 16 clips × 6 windows
    assert m["source_model"]["split"]["test_fold"] == 1
    arena = m["tensor_arena"]
    assert 4096 < arena["measured_bytes"] < 64 * 1024
    assert arena["arena_bytes"] >= arena["measured_bytes"] + 2048 and arena["arena_bytes"] % 16 == 0
    assert arena["allocation_total_bytes"] <= arena["measured_bytes"]
    assert m["target"]["name"] == "cortex-m4-256k" and m["budget"]["fits"] is True
    assert m["budget"]["flash"]["model_bytes"] == len(flatbuffer)
    assert m["budget"]["ram"]["tensor_arena_bytes"] == arena["arena_bytes"]
    assert m["source_model"]["macs_per_window"] == models.count_macs(
        models.load_classifier(str(edge_model))[0]
    )
    for package in ("tensorflow", "tflite-micro", "ai-edge-litert"):
        assert m["versions"][package]
    assert m["golden"]["n"] == 4 and m["golden"]["labels"] == m["labels"]  # one window of each class
    assert m["golden"]["features_recomputed_max_abs_diff"] < 1e-3


def test_tflm_runs_the_golden_vectors_and_agrees_with_litert(artifact, edge_model):
    m = manifest_of(artifact)
    flatbuffer = (artifact / "model_int8.tflite").read_bytes()
    features = np.load(artifact / "golden" / "features.npy")
    inputs = np.load(artifact / "golden" / "input_int8.npy")
    expected = np.load(artifact / "golden" / "output_int8.npy")
    q = m["quantization"]
    np.testing.assert_array_equal(
        edge.quantize(features, scale=q["input_scale"], zero_point=q["input_zero_point"]), inputs
    )
    arena = m["tensor_arena"]
    np.testing.assert_array_equal(
        edge.tflm_invoke(flatbuffer, inputs, arena_size_bytes=arena["arena_bytes"]), expected
    )
    builtin = edge.litert_invoke(flatbuffer, inputs, kernels="builtin")
    assert np.abs(builtin.astype(int) - expected).max() <= compile_edge.MAX_INTERPRETER_DIFF_STEPS
    np.testing.assert_array_equal(builtin.argmax(axis=1), expected.argmax(axis=1))
    xnnpack = edge.litert_invoke(flatbuffer, inputs, kernels="xnnpack")
    assert np.abs(xnnpack.astype(int) - expected).max() <= 16
    # the measured arena is the smallest that works (bisection to 16 bytes)
    with pytest.raises(ConfigError, match="TensorFlow Lite Micro cannot run the model"):
        edge.tflm_invoke(flatbuffer, inputs[:1], arena_size_bytes=arena["measured_bytes"] - 16)
    # int8 against the float model on the same windows
    model, _ = models.load_classifier(str(edge_model))
    float_probs = model.predict(features, verbose=0)
    int8_probs = edge.dequantize(expected, scale=q["output_scale"], zero_point=q["output_zero_point"])
    assert np.abs(int8_probs - float_probs).max() < 0.1
    np.testing.assert_array_equal(int8_probs.argmax(axis=1), float_probs.argmax(axis=1))


def test_report_float_vs_int8(artifact):
    report = json.loads((artifact / "report.json").read_text())
    assert report["status"] == "ok" and report["problems"] == []
    v = report["verification"]
    assert v["held_out"] == "fold 1" and v["n_clips"] == 8 and v["n_windows"] == 48
    clip = v["clip_accuracy"]
    assert clip["float"] >= 0.75 and abs(clip["int8"] - clip["float"]) <= ONE_CLIP_PP / 100
    assert clip["delta_pp"] == pytest.approx(100 * (clip["int8"] - clip["float"]), abs=0.01)
    assert v["window_top_class_agreement"] >= 0.9
    assert set(v["per_class"]) == {"chirp", "click_train", "hum", "noise_burst"}
    assert all(row["support"] == 2 for row in v["per_class"].values())
    builtin = v["interpreters"]["tflite-micro vs litert-builtin"]
    assert builtin["max_abs_diff_steps"] <= compile_edge.MAX_INTERPRETER_DIFF_STEPS
    assert builtin["share_identical"] >= 0.9 and builtin["top_class_agreement"] == 1.0
    assert v["interpreters"]["tflite-micro vs litert-xnnpack"]["top_class_agreement"] >= 0.9
    text = (artifact / "report.md").read_text()
    assert "| clip accuracy (mean of windows) |" in text and "| tflite-micro vs litert-builtin |" in text
    assert "on cortex-m4-256k" in text and "fits" in text


# -- feature parity ------------------------------------------------------------------------------


def parse_header(text: str) -> tuple[dict, dict]:
    """``(#define values, static const arrays)`` of a generated header."""
    defines = {}
    for name, value in re.findall(r"^#define (\w+) (.+)$", text, flags=re.M):
        value = value.strip().strip("()")
        if value.startswith('"'):
            defines[name] = value.strip('"')
        elif re.fullmatch(r"-?\d+", value):
            defines[name] = int(value)
        else:
            defines[name] = float(value.rstrip("f"))
    arrays = {}
    pattern = r"static const (float|uint16_t) (\w+)(?:\[[^\]]+\])+ = \{(.*?)\};"
    for ctype, name, body in re.findall(pattern, text, flags=re.S):
        values = [v.strip(" \n{}").rstrip("f") for v in body.split(",") if v.strip(" \n{}")]
        arrays[name] = np.array(values, dtype=np.float64 if ctype == "float" else np.int64)
    return defines, arrays


def reference_log_mel(audio: np.ndarray, d: dict, a: dict) -> np.ndarray:
    """Features of one window, step by step as a device computes them, from the header's constants.

    Args:
        audio: ``[SOUNDSHARD_WINDOW_SAMPLES]`` the samples the device frames.

    Returns:
        float64 ``[n_mels, window_frames]``.
    """
    n_fft, hop, n_mels = d["SOUNDSHARD_N_FFT"], d["SOUNDSHARD_HOP_LENGTH"], d["SOUNDSHARD_N_MELS"]
    out = np.zeros((n_mels, d["SOUNDSHARD_WINDOW_FRAMES"]))
    for t in range(d["SOUNDSHARD_WINDOW_FRAMES"]):
        frame = audio[t * hop : t * hop + n_fft].astype(np.float64)  # 1. frame
        windowed = frame * a["kSoundshardWindow"]  # 2. window
        spectrum = np.fft.rfft(windowed)  # 3. rfft
        power = spectrum.real**2 + spectrum.imag**2  # 4. power
        if d["SOUNDSHARD_POWER"] != 2.0:
            power = power ** (d["SOUNDSHARD_POWER"] / 2)
        for m in range(n_mels):  # 5. sparse mel
            first, count = a["kSoundshardMelFirstBin"][m], a["kSoundshardMelNBins"][m]
            offset = a["kSoundshardMelOffset"][m]
            mel = np.dot(a["kSoundshardMelWeights"][offset : offset + count], power[first : first + count])
            if d["SOUNDSHARD_LOG_COMPRESSION"] == 1:  # 6. log
                mel = 10 * np.log10(max(mel, d["SOUNDSHARD_AMIN"])) - d["SOUNDSHARD_REF_DB"]
            elif d["SOUNDSHARD_LOG_COMPRESSION"] == 2:
                mel = np.log(mel + d["SOUNDSHARD_AMIN"])
            out[m, t] = mel
    if d["SOUNDSHARD_HAS_TOP_DB"]:  # 7. top_db over the whole window
        out = np.maximum(out, out.max() - d["SOUNDSHARD_TOP_DB"])
    if d.get("SOUNDSHARD_FEATURE_TYPE") == 1:  # 7b. MFCC and deltas
        n_mfcc, frames, half = (
            d["SOUNDSHARD_N_MFCC"],
            d["SOUNDSHARD_WINDOW_FRAMES"],
            d["SOUNDSHARD_DELTA_WIDTH"] // 2,
        )
        coefficients = a["kSoundshardDct"].reshape(n_mfcc, n_mels) @ out
        rows = [coefficients]
        filters = a.get("kSoundshardDelta", np.zeros(0)).reshape(-1, d["SOUNDSHARD_DELTA_WIDTH"])
        for order in range(d["SOUNDSHARD_MFCC_DELTAS"]):
            delta = np.zeros_like(coefficients)
            for t in range(frames):
                u = min(max(t, half), frames - 1 - half)
                delta[:, t] = coefficients[:, u - half : u + half + 1] @ filters[order]
            rows.append(delta)
        out = np.concatenate(rows)
    if d["SOUNDSHARD_NORMALIZATION"] >= 1:  # 8. normalise over the window
        out = out - out.mean()
    if d["SOUNDSHARD_NORMALIZATION"] == 2:
        out = out / max(out.std(), d["SOUNDSHARD_NORM_STD_FLOOR"])
    return out


def test_feature_parity_with_the_header_constants(artifact):
    d, a = parse_header((artifact / "soundshard_features.h").read_text())
    m = manifest_of(artifact)
    config = FeatureConfig.from_dict(m["feature_config"])
    assert d["SOUNDSHARD_FEATURES_FINGERPRINT"] == config.fingerprint
    assert (d["SOUNDSHARD_SAMPLE_RATE_HZ"], d["SOUNDSHARD_N_FFT"], d["SOUNDSHARD_HOP_LENGTH"]) == (
        22050,
        1024,
        512,
    )
    assert d["SOUNDSHARD_WINDOW_SAMPLES"] == 40 * 512 + 1024 and d["SOUNDSHARD_TOP_DB"] == 80.0
    assert len(a["kSoundshardWindow"]) == 1024 and len(a["kSoundshardMelFirstBin"]) == 60
    assert len(a["kSoundshardMelWeights"]) == d["SOUNDSHARD_MEL_N_WEIGHTS"] == a["kSoundshardMelNBins"].sum()
    # the sparse filterbank is the training filterbank
    dense = np.zeros((60, 513))
    for band in range(60):
        first, count = a["kSoundshardMelFirstBin"][band], a["kSoundshardMelNBins"][band]
        offset = a["kSoundshardMelOffset"][band]
        dense[band, first : first + count] = a["kSoundshardMelWeights"][offset : offset + count]
    np.testing.assert_allclose(dense, melspec.mel_filterbank(config), rtol=1e-6, atol=1e-9)
    audio = np.load(artifact / "golden" / "audio.npy")
    training_features = np.load(artifact / "golden" / "features.npy")
    assert audio.shape == (4, d["SOUNDSHARD_WINDOW_SAMPLES"]) and np.abs(audio).max() > 0.01
    for clip_audio, expected in zip(audio, training_features, strict=True):
        got = reference_log_mel(clip_audio, d, a)
        assert np.abs(got - expected).max() <= PARITY_TOLERANCE_DB
        assert expected.max() - expected.min() > 20  # real content, not a clamped silent window


# -- C sources ----------------------------------------------------------------------------------

C_CHECK = r"""
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "golden_vectors.h"
#include "model_data.h"
#include "soundshard_features.h"

_Static_assert(SOUNDSHARD_INPUT_SIZE == SOUNDSHARD_FEATURE_SIZE, "model input is one feature window");
_Static_assert(SOUNDSHARD_INPUT_DIM0 == SOUNDSHARD_FEATURE_ROWS, "input layout [rows, window_frames]");
_Static_assert(SOUNDSHARD_INPUT_DIM1 == SOUNDSHARD_WINDOW_FRAMES, "input layout [rows, window_frames]");
_Static_assert(sizeof(kSoundshardWindow) == SOUNDSHARD_N_FFT * sizeof(float), "window table");
_Static_assert(sizeof(kSoundshardMelWeights) == SOUNDSHARD_MEL_N_WEIGHTS * sizeof(float), "mel weights");
_Static_assert(sizeof(g_golden_output[0]) == SOUNDSHARD_N_LABELS, "one output per label");
_Static_assert(SOUNDSHARD_GOLDEN_AUDIO_SAMPLES == SOUNDSHARD_WINDOW_SAMPLES, "golden audio is one window");
_Static_assert(SOUNDSHARD_LEVEL_A_SOS_SIZE == 6 * SOUNDSHARD_LEVEL_A_SECTIONS, "6 coefficients a section");

static float features[SOUNDSHARD_FEATURE_SIZE];
static float logmel[SOUNDSHARD_N_MELS * SOUNDSHARD_WINDOW_FRAMES];
static double cos_table[SOUNDSHARD_N_FFT], sin_table[SOUNDSHARD_N_FFT];

/* Features of one window from the header's constants; a plain DFT stands in for the device FFT. */
static void log_mel(const float* audio) {
  float frame[SOUNDSHARD_N_FFT], power[SOUNDSHARD_N_FFT_BINS];
  for (int t = 0; t < SOUNDSHARD_WINDOW_FRAMES; ++t) {
    for (int n = 0; n < SOUNDSHARD_N_FFT; ++n)
      frame[n] = audio[t * SOUNDSHARD_HOP_LENGTH + n] * kSoundshardWindow[n];
    for (int k = 0; k < SOUNDSHARD_N_FFT_BINS; ++k) {
      double re = 0.0, im = 0.0;
      for (int n = 0; n < SOUNDSHARD_N_FFT; ++n) {
        int i = (int)(((long)k * n) % SOUNDSHARD_N_FFT);
        re += frame[n] * cos_table[i];
        im -= frame[n] * sin_table[i];
      }
      power[k] = (float)(re * re + im * im);
    }
    for (int m = 0; m < SOUNDSHARD_N_MELS; ++m) {
      float mel = 0.0f;
      for (int k = 0; k < kSoundshardMelNBins[m]; ++k)
        mel += kSoundshardMelWeights[kSoundshardMelOffset[m] + k] * power[kSoundshardMelFirstBin[m] + k];
      logmel[m * SOUNDSHARD_WINDOW_FRAMES + t] =
          10.0f * log10f(mel > SOUNDSHARD_AMIN ? mel : SOUNDSHARD_AMIN) - SOUNDSHARD_REF_DB;
    }
  }
  const int size = SOUNDSHARD_N_MELS * SOUNDSHARD_WINDOW_FRAMES;
  float peak = logmel[0];
  for (int i = 1; i < size; ++i) peak = logmel[i] > peak ? logmel[i] : peak;
  for (int i = 0; i < size; ++i)
    if (logmel[i] < peak - SOUNDSHARD_TOP_DB) logmel[i] = peak - SOUNDSHARD_TOP_DB;
#if SOUNDSHARD_FEATURE_TYPE == 1
  const int frames = SOUNDSHARD_WINDOW_FRAMES, half = SOUNDSHARD_DELTA_WIDTH / 2;
  for (int k = 0; k < SOUNDSHARD_N_MFCC; ++k)
    for (int t = 0; t < frames; ++t) {
      float c = 0.0f;
      for (int m = 0; m < SOUNDSHARD_N_MELS; ++m)
        c += kSoundshardDct[k * SOUNDSHARD_N_MELS + m] * logmel[m * frames + t];
      features[k * frames + t] = c;
    }
#if SOUNDSHARD_MFCC_DELTAS > 0
  for (int o = 1; o <= SOUNDSHARD_MFCC_DELTAS; ++o)
    for (int k = 0; k < SOUNDSHARD_N_MFCC; ++k)
      for (int t = 0; t < frames; ++t) {
        int u = t < half ? half : (t > frames - 1 - half ? frames - 1 - half : t);
        float d = 0.0f;
        for (int j = 0; j < SOUNDSHARD_DELTA_WIDTH; ++j)
          d += kSoundshardDelta[o - 1][j] * features[k * frames + u + j - half];
        features[(o * SOUNDSHARD_N_MFCC + k) * frames + t] = d;
      }
#endif
#else
  for (int i = 0; i < size; ++i) features[i] = logmel[i];
#endif
}

int main(void) {
  int bad = 0;
  if (g_model_data_len != SOUNDSHARD_MODEL_DATA_LEN) bad |= 1;
  if ((uintptr_t)g_model_data % 16 != 0) bad |= 2;
  if (memcmp(g_model_data + 4, "TFL3", 4) != 0) bad |= 4;
  if (strcmp(SOUNDSHARD_FEATURES_FINGERPRINT, SOUNDSHARD_MODEL_FEATURES_FINGERPRINT) != 0) bad |= 8;
  if (SOUNDSHARD_TENSOR_ARENA_BYTES < SOUNDSHARD_TENSOR_ARENA_MEASURED_BYTES) bad |= 16;
  for (int i = 0; i < SOUNDSHARD_N_FFT; ++i) {
    cos_table[i] = cos(2.0 * 3.14159265358979323846 * i / SOUNDSHARD_N_FFT);
    sin_table[i] = sin(2.0 * 3.14159265358979323846 * i / SOUNDSHARD_N_FFT);
  }
  double feature_error = 0.0;
  int input_error = 0;
  for (int g = 0; g < SOUNDSHARD_GOLDEN_N; ++g) {
    log_mel(g_golden_audio[g]);
    for (int i = 0; i < SOUNDSHARD_FEATURE_SIZE; ++i) {
      double e = fabs(features[i] - g_golden_features[g][i]);
      feature_error = e > feature_error ? e : feature_error;
      long q = lroundf(g_golden_features[g][i] / SOUNDSHARD_INPUT_SCALE) + SOUNDSHARD_INPUT_ZERO_POINT;
      q = q < -128 ? -128 : (q > 127 ? 127 : q);
      int d = abs((int)q - g_golden_input[g][i]);
      input_error = d > input_error ? d : input_error;
    }
  }
  /* LAeq of each window from rest, fed in uneven blocks as a device's audio callback would */
  double laeq_error = 0.0;
  for (int g = 0; g < SOUNDSHARD_GOLDEN_N; ++g) {
    soundshard_level_state level;
    soundshard_level_reset(&level);
    const int total = SOUNDSHARD_GOLDEN_AUDIO_SAMPLES;
    for (int start = 0, block = 1; start < total; start += block, block = 2 * block + 1) {
      int n = total - start < block ? total - start : block;
      soundshard_level_process(&level, g_golden_audio[g] + start, n);
    }
    if (level.n_samples != SOUNDSHARD_GOLDEN_AUDIO_SAMPLES) bad |= 32;
    double e = fabs(soundshard_level_laeq_db(&level) - g_golden_laeq_db[g]);
    laeq_error = e > laeq_error ? e : laeq_error;
    printf("laeq %d %.6f %.6f\n", g, soundshard_level_laeq_db(&level), (double)g_golden_laeq_db[g]);
  }
  if (!(laeq_error <= LAEQ_TOLERANCE_DB)) bad |= 64;
  soundshard_level_state silent;
  soundshard_level_reset(&silent);
  if (soundshard_level_laeq_db(&silent) != SOUNDSHARD_LEVEL_SILENCE_DB) bad |= 128;
  printf("%u %d %s %d %.6f %d %.6f\n", g_model_data_len, SOUNDSHARD_N_LABELS, g_model_labels[0], bad,
         feature_error, input_error, laeq_error);
  return bad;
}
"""


def run_c_check(artifact: Path, tmp_path: Path) -> list[str]:
    """Compiles C_CHECK against an artifact's sources and runs it: its output lines."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler: `cc` is not on PATH")
    check = tmp_path / "check.c"
    check.write_text(C_CHECK.replace("#include <stdio.h>", "#include <stdio.h>\n#include <stdlib.h>"))
    exe = tmp_path / "check"
    sources = [check, artifact / "model_data.c", artifact / "golden_vectors.c"]
    command = ["cc", "-std=c11", "-Wall", "-Werror", "-O2", f"-DLAEQ_TOLERANCE_DB={C_LAEQ_TOLERANCE_DB}"]
    command += ["-I", artifact, *sources, "-o", exe, "-lm"]
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout.splitlines()


def test_c_sources_compile_and_match_the_golden_vectors(artifact, tmp_path):
    assert (artifact / "model_data.c").read_text() == (artifact / "model_data.cc").read_text()
    assert "alignas(16) const unsigned char g_model_data[]" in (artifact / "model_data.c").read_text()
    *laeq_lines, summary = run_c_check(artifact, tmp_path)
    length, n_labels, first_label, bad, feature_error, input_error, laeq_error = summary.split()
    m = manifest_of(artifact)
    assert (int(length), int(n_labels), first_label, int(bad)) == (m["model_bytes"], 4, "chirp", 0)
    assert float(feature_error) <= C_PARITY_TOLERANCE_DB
    assert int(input_error) <= 1  # float32 rounding at a .5 boundary
    # the C LAeq of each golden window is the levels stage's (recomputed here from golden/audio.npy)
    audio = np.load(artifact / "golden" / "audio.npy")
    rate = m["feature_config"]["sample_rate_hz"]
    expected = [
        levels.span_levels(levels.recording_blocks(row, sample_rate_hz=rate), span_s=60, sample_rate_hz=rate)[
            "laeq"
        ][0]
        for row in audio
    ]
    assert [line.split()[:2] for line in laeq_lines] == [["laeq", str(g)] for g in range(len(audio))]
    c_laeq = np.array([float(line.split()[2]) for line in laeq_lines])
    header_laeq = np.array([float(line.split()[3]) for line in laeq_lines])
    np.testing.assert_allclose(header_laeq, expected, atol=1e-4)  # float32 literals of the golden file
    assert np.abs(c_laeq - expected).max() <= C_LAEQ_TOLERANCE_DB
    assert float(laeq_error) == pytest.approx(np.abs(c_laeq - header_laeq).max(), abs=2e-6)
    assert np.all(c_laeq > -100)  # real content, not silent windows
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler: model_data.cc compiled as C only")
    command = ["c++", "-std=c++11", "-Wall", "-Werror", "-I", artifact, "-c", artifact / "model_data.cc"]
    command += ["-o", tmp_path / "model_data.o"]
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# -- refusals and budgets ------------------------------------------------------------------------


def test_model_that_cannot_be_fully_int8_quantised_is_refused(edge_model, demo_features, tmp_path, capsys):
    import keras

    folder = tmp_path / "float-frontend"
    folder.mkdir()
    shutil.copy(edge_model / "model.json", folder / "model.json")
    inputs = keras.Input((60, 41), name="features")
    x = keras.layers.Flatten()(inputs)
    # a spectrogram inside the model: RFFT2D has no int8 kernel, so the converter leaves it in float
    x = keras.layers.MelSpectrogram(fft_length=256, sequence_stride=128, num_mel_bins=8)(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Softmax()(keras.layers.Dense(4)(x))
    keras.Model(inputs, outputs).save(folder / "model.keras")
    reseal_model_folder(folder)  # a consistent folder, so the converter's refusal is what is tested
    out = tmp_path / "edge"
    argv = ["--model-dir", folder, "--features", demo_features, "--output", out, "--quiet"]
    assert compile_edge.run([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "cannot be fully int8-quantised" in err and "RFFT2D" in err and "FLOAT32" in err
    assert not out.exists()


def test_over_budget_target_fails_with_the_figures(artifact, edge_model, demo_features, monkeypatch, capsys):
    tiny = edge_schema.TargetProfile(
        name="tiny-m0",
        description="test profile smaller than the model",
        flash_bytes=48 * 1024,
        ram_bytes=32 * 1024,
        reserved_flash_bytes=16 * 1024,
        reserved_ram_bytes=4 * 1024,
    )
    monkeypatch.setitem(edge_schema.TARGETS, tiny.name, tiny)
    out = artifact.parent / "edge-tiny"
    shutil.copytree(artifact, out)  # an earlier artifact in the output folder is replaced
    argv = ["--model-dir", edge_model, "--features", demo_features, "--target", "tiny-m0", "--output", out]
    argv += ["--max-accuracy-drop", ONE_CLIP_PP, "--quiet"]
    assert compile_edge.run([str(a) for a in argv]) == 3
    captured = capsys.readouterr()
    m = manifest_of(artifact)
    flash_needed = m["model_bytes"] + m["budget"]["flash"]["feature_tables_bytes"] + 16 * 1024
    assert f"flash {flash_needed / 1024:.1f} KiB of 48.0 KiB on tiny-m0" in captured.out
    assert "over budget" in captured.err and "OVER by" in captured.err
    # and says where a model of this size would fit (the edge model fits every real target)
    fits = ", ".join(sorted(t for t in edge_schema.TARGETS if t != "tiny-m0"))
    assert f"hint: a model of this size fits {fits}; microcontroller-sized models are" in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "over budget" and report["budget"]["fits"] is False
    assert report["budget"]["flash"]["needed_bytes"] == flash_needed
    assert report["budget"]["ram"]["headroom_bytes"] < 0
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".compile-edge-")]


def test_sbcnn_is_over_the_cortex_m4_flash_budget(demo_features):
    """SB-CNN (196 k parameters) in int8 does not fit 256 KiB of flash with the runtime reserve."""
    dataset = training.read_dataset_json(str(demo_features))
    windows = training.load_windows(str(demo_features), dataset)
    model = models.build_model("sbcnn", input_shape=(60, 41), n_classes=4, normalization=(-40.0, 400.0))
    split = {"by": "fold", "test_fold": 1, "validation_fold": 2, "train_folds": [3, 4]}
    representative, _ = edge.representative_set(windows, split=split, n_windows=16)
    flatbuffer = edge.convert_int8(model, representative=representative)
    assert len(flatbuffer) > 190_000
    config = FeatureConfig.from_dict(dataset["feature_config"])
    tables = edge.feature_tables(config)
    target = edge_schema.target_profile("cortex-m4-256k")
    fit = edge.budget(
        target,
        model_bytes=len(flatbuffer),
        feature_flash_bytes=tables.flash_bytes,
        arena_bytes=60_000,
        feature_ram_bytes=tables.ram_bytes,
    )
    assert fit["fits"] is False and fit["flash"]["headroom_bytes"] < 0
    assert fit["flash"]["needed_bytes"] == len(flatbuffer) + tables.flash_bytes + 64 * 1024
    assert "OVER by" in edge.budget_lines(fit)[0]
    assert (
        edge.budget(
            edge_schema.target_profile("cortex-m7-1m"),
            model_bytes=len(flatbuffer),
            feature_flash_bytes=tables.flash_bytes,
            arena_bytes=60_000,
            feature_ram_bytes=tables.ram_bytes,
        )["fits"]
        is True
    )


def test_configuration_errors(edge_model, demo_features, tmp_path, capsys):
    base = ["--model-dir", str(edge_model), "--features", str(demo_features), "--output", str(tmp_path / "e")]
    assert compile_edge.run([*base, "--target", "cortex-m4-265k"]) == 2
    assert "did you mean 'cortex-m4-256k'" in capsys.readouterr().err
    assert compile_edge.run([*base, "--golden", "0"]) == 2
    assert "--golden=0 must lie in 1..16" in capsys.readouterr().err
    assert compile_edge.run([*base[:2], "--features", str(tmp_path), *base[4:]]) == 2
    assert "has no dataset.json" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
    with pytest.raises(ConfigError, match="normalization_scope='recording' needs whole recordings"):
        edge.feature_tables(FeatureConfig(normalization="standardize", normalization_scope="recording"))
    with pytest.raises(ConfigError, match="reserved_ram_bytes=70000 leaves no RAM"):
        edge_schema.TargetProfile(
            name="x",
            description="",
            flash_bytes=1,
            ram_bytes=65536,
            reserved_flash_bytes=0,
            reserved_ram_bytes=70000,
        )


def test_representative_set_never_uses_held_out_windows():
    rng = np.random.default_rng(0)
    folds = np.repeat(np.arange(1, 6), 20).astype(np.int32)
    augmented = np.zeros(100, bool)
    augmented[::7] = True
    windows = training.WindowSet(
        rng.standard_normal((100, 3, 2)).astype(np.float32),
        np.arange(100, dtype=np.int32) % 3,
        np.array([f"c{i // 2}" for i in range(100)], dtype=object),
        folds,
        np.full(100, "", dtype=object),
        augmented,
    )
    split = {"by": "fold", "test_fold": 1, "validation_fold": 2, "train_folds": [3, 4, 5]}
    features, info = edge.representative_set(windows, split=split, n_windows=500, seed=1)
    allowed = np.isin(folds, [3, 4, 5]) & ~augmented
    assert len(features) == info["n_windows"] == info["n_available"] == allowed.sum()
    np.testing.assert_array_equal(features, windows.features[allowed])  # all, in order
    few, info = edge.representative_set(windows, split=split, n_windows=10, seed=1)
    assert len(few) == 10 and all((row == windows.features[allowed]).all(axis=(1, 2)).any() for row in few)
    with pytest.raises(ConfigError, match="does not name training folds apart from held-out ones"):
        edge.representative_set(windows, split={**split, "train_folds": [1, 3]})


def test_c_literals_and_sparse_filterbank():
    assert cexport.c_float(2.0) == "2.0f" and cexport.c_float(0.5) == "0.5f"
    assert float(cexport.c_float(1e-10)[:-1]) == pytest.approx(1e-10)
    assert np.float32(float(cexport.c_float(0.1)[:-1])) == np.float32(0.1)  # round-trips
    assert cexport.c_string('a"b\\c?é') == '"a\\"b\\\\c\\077\\303\\251"'
    banner = cexport._banner("x */ y", ["a\nb */"])
    assert banner.count("*/") == 1 and banner.rstrip().endswith("*/")
    config = FeatureConfig(sample_rate_hz=16000, n_fft=512, hop_length=256, n_mels=40, fmin_hz=50.0)
    tables = edge.feature_tables(config)
    np.testing.assert_array_equal(tables.dense_filterbank(), melspec.mel_filterbank(config))
    assert tables.window_samples == 40 * 256 + 512
    assert edge.arena_with_margin(10_000) == (12_048, 2_048)
    assert edge.arena_with_margin(100_000) == (110_000, 10_000)


@pytest.mark.parametrize("sample_rate_hz", [16000, 22050, 44100])
def test_level_header_carries_the_levels_stage_a_weighting(sample_rate_hz):
    config = FeatureConfig(sample_rate_hz=sample_rate_hz, n_fft=512, hop_length=256, n_mels=40, fmin_hz=50.0)
    d, a = parse_header(cexport.features_header(edge.feature_tables(config)))
    sos = levels.weighting_sos("A", sample_rate_hz)
    assert d["SOUNDSHARD_LEVEL_A_SECTIONS"] == len(sos) and d["SOUNDSHARD_LEVEL_A_SOS_SIZE"] == sos.size
    emitted = a["kSoundshardLevelASos"].reshape(-1, 6).astype(np.float32)  # what the C compiler reads
    np.testing.assert_array_equal(emitted, sos.astype(np.float32))
    np.testing.assert_array_equal(cexport.level_a_sos(sample_rate_hz), sos.astype(np.float32))
    assert (emitted[:, 3] == 1.0).all()  # a0 = 1: the C cascade leaves it out
    assert d["SOUNDSHARD_LEVEL_SILENCE_DB"] == levels.SILENCE_DB
    assert 10 * np.log10(d["SOUNDSHARD_LEVEL_FLOOR_MEAN_SQUARE"]) == pytest.approx(levels.SILENCE_DB)
    # the golden LAeq is the levels stage's over the window, the filter from rest
    rng = np.random.default_rng(7)
    audio = np.stack([0.1 * rng.standard_normal(sample_rate_hz // 2), np.zeros(sample_rate_hz // 2)])
    got = cexport.golden_laeq_db(audio, sample_rate_hz=sample_rate_hz)
    blocks = levels.recording_blocks(audio[0], sample_rate_hz=sample_rate_hz)
    laeq = levels.span_levels(blocks, span_s=1, sample_rate_hz=sample_rate_hz)["laeq"]
    assert got[0] == pytest.approx(laeq[0], abs=1e-9) and got[1] == levels.SILENCE_DB


def test_demo_ends_with_an_edge_artifact(edge_model, demo_features, tmp_path, capsys):
    from soundshard.pipelines import demo

    code = demo.compile_edge_step(str(tmp_path), features=str(demo_features), model=str(edge_model))
    assert code == 0
    out = capsys.readouterr().out
    assert "cortex-m4-256k" in out and "artifact: golden_vectors.c" in out and "model_data.h" in out
    assert manifest_of(tmp_path / "edge")["budget"]["fits"] is True


def test_edge_sized_dscnn_compiles_to_int8_within_the_cortex_m4_budget(demo_features, tmp_path):
    """The smallest of the dscnn family, two blocks per stage (so its residual adds are there too),
    trains, reloads in safe mode and compiles to an int8 artifact that fits cortex-m4-256k, with
    TFLite Micro agreeing with LiteRT."""
    folder = tmp_path / "dscnn"
    argv = ["--features", demo_features, "--arch", "dscnn-xs", "--depth-multiplier", 2, "--test-fold", 1]
    argv += ["--output", folder, "--epochs", 4, "--patience", 4, "--batch-size", 16, "--quiet"]
    assert train.run([str(a) for a in argv]) == 0
    model, description = models.load_classifier(str(folder))
    assert description["training"]["layers"] == {
        "stem": 16,
        "stem_stride": 2,
        "stages": [24, 32, 48, 64],
        "blocks": 2,
    }
    assert any(layer.name.endswith("_add") for layer in model.layers)
    out = tmp_path / "edge"
    argv = ["--model-dir", folder, "--features", demo_features, "--target", "cortex-m4-256k", "--output", out]
    argv += ["--max-accuracy-drop", 100, "--quiet"]
    assert compile_edge.run([str(a) for a in argv]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok" and report["budget"]["fits"] is True
    assert {"DEPTHWISE_CONV_2D", "CONV_2D", "ADD", "FULLY_CONNECTED"} <= set(report["int8"]["ops"])
    agree = report["verification"]["interpreters"]["tflite-micro vs litert-builtin"]
    assert agree["max_abs_diff_steps"] <= compile_edge.MAX_INTERPRETER_DIFF_STEPS


def test_mfcc_features_from_audio_to_the_device_header(demo_features, tmp_path):
    """MFCC with deltas end to end: features, an edge-sized model, its int8 artifact, and the
    header's steps in Python and in C giving the training features from the golden audio."""
    root = demo_features.parent
    out = tmp_path / "mfcc"
    argv = ["--input", root / "audio", "--manifest", root / "manifest.csv", "--output", out]
    argv += ["--format", "parquet", "--feature-type", "mfcc", "--n-mfcc", 13, "--mfcc-deltas", 2]
    assert features.run([str(a) for a in argv]) == 0
    config = FeatureConfig.from_dict(json.loads((out / "dataset.json").read_text())["feature_config"])
    assert config.feature_shape == (39, 41)
    folder = tmp_path / "model"
    argv = ["--features", out, "--arch", "dscnn-xs", "--test-fold", 1, "--output", folder]
    argv += ["--epochs", 6, "--patience", 6, "--batch-size", 16, "--quiet"]
    assert train.run([str(a) for a in argv]) == 0
    description = json.loads((folder / "model.json").read_text())
    aug = description["training"]["augmentation"]
    assert aug["noise_prob"] == 0 and aug["background_mix_prob"] == 0 and aug["freq_mask_bands"] == 0
    assert aug["gain_profile"][0] == pytest.approx(60**0.5) and not any(aug["gain_profile"][1:])
    artifact = tmp_path / "edge"
    argv = ["--model-dir", folder, "--features", out, "--target", "cortex-m4-256k", "--output", artifact]
    assert compile_edge.run([str(a) for a in [*argv, "--max-accuracy-drop", 100, "--quiet"]]) == 0
    d, a = parse_header((artifact / "soundshard_features.h").read_text())
    assert (d["SOUNDSHARD_FEATURE_TYPE"], d["SOUNDSHARD_FEATURE_ROWS"], d["SOUNDSHARD_N_MFCC"]) == (1, 39, 13)
    assert d["SOUNDSHARD_FEATURE_SIZE"] == 39 * 41 and a["kSoundshardDct"].size == 13 * 60
    np.testing.assert_allclose(a["kSoundshardDct"].reshape(13, 60), melspec.dct_matrix(13, 60), rtol=1e-6)
    audio = np.load(artifact / "golden" / "audio.npy")
    expected = np.load(artifact / "golden" / "features.npy")
    assert expected.shape[1:] == (39, 41)
    # a dB error of the log-mels reaches the first coefficient sqrt(n_mels) times
    tolerance = PARITY_TOLERANCE_DB * 60**0.5
    for clip_audio, want in zip(audio, expected, strict=True):
        assert np.abs(reference_log_mel(clip_audio, d, a) - want).max() <= tolerance
    *_, summary = run_c_check(artifact, tmp_path)
    _, n_labels, _, bad, feature_error, input_error, _ = summary.split()
    assert (int(n_labels), int(bad)) == (4, 0)
    assert float(feature_error) <= C_PARITY_TOLERANCE_DB * 60**0.5 and int(input_error) <= 1
