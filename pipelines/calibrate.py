"""``soundshard calibrate FILE``: the calibration offset of a sensor from a recording of a sound
calibrator (a steady 1 kHz tone at a known level, usually 94 or 114 dB SPL).

    soundshard calibrate recordings/north/mic2/calibration.wav --reference-db 94
    soundshard calibrate cal.flac --reference-db 114 --site north --deployment mic2 >> sensors.csv

The offset it prints is what ``--level-offset-db``, a manifest's ``level_offset_db`` column or a
``--calibration-table`` row (``--site``: printed as such a row) give the levels stage. The file is
measured at its own sample rate (at 1 kHz the A, C and Z weightings agree).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from soundshard.schemas.errors import ConfigError, SoundshardError

PROG = "soundshard calibrate"


def make_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """Argument parser of ``soundshard calibrate``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Derive a sensor's calibration offset (dB SPL of 0 dBFS) from a recording of a "
        "sound calibrator.",
        allow_abbrev=False,
    )
    parser.add_argument("path", help="The calibrator recording (local, gs://, s3://...).")
    parser.add_argument(
        "--reference-db",
        type=float,
        default=94.0,
        help="The calibrator's level, dB SPL. Default: %(default)s.",
    )
    parser.add_argument(
        "--tone-hz", type=float, default=1000.0, help="The calibrator's frequency. Default: %(default)s."
    )
    parser.add_argument(
        "--steady-s",
        type=float,
        default=3.0,
        help="Seconds the tone must hold within 0.5 dB. Default: %(default)s.",
    )
    parser.add_argument("--site", default=None, help="Print a --calibration-table row for this site.")
    parser.add_argument("--deployment", default=None, help="With --site: the deployment of the row.")
    parser.add_argument("--json", action="store_true", help="Print the measurement as JSON. Default: text.")
    return parser


def run(argv: Sequence[str] | None = None, *, prog: str = PROG) -> int:
    """Runs ``soundshard calibrate``; returns 0, or 2 when the file holds no calibrator tone."""
    args = make_parser(prog).parse_args(argv)
    from soundshard.schemas.uris import redact
    from soundshard.transforms.audio.decode import decode_audio
    from soundshard.transforms.io import storage
    from soundshard.transforms.levels import meter as levels

    try:
        if args.deployment and not args.site:
            raise ConfigError("--deployment needs --site")
        if not 0 < args.reference_db < 200:
            raise ConfigError(
                f"--reference-db={args.reference_db} must be a level in dB SPL (e.g. 94 or 114)"
            )
        storage.check_store(args.path, flag="path")
        import io

        import fsspec
        import soundfile

        try:
            with fsspec.open(args.path, "rb") as f:
                data = io.BytesIO(f.read())  # a calibration is a short recording
            rate = soundfile.info(data).samplerate
        except (OSError, soundfile.LibsndfileError, RuntimeError) as exc:
            raise ConfigError(f"cannot read {redact(args.path)}: {exc}") from None
        data.seek(0)
        audio = decode_audio(data, sample_rate_hz=rate, name=redact(args.path))
        try:
            found = levels.calibrator_offset(
                audio.samples,
                sample_rate_hz=rate,
                reference_db=args.reference_db,
                tone_hz=args.tone_hz,
                steady_s=args.steady_s,
            )
        except ValueError as exc:
            raise ConfigError(f"{redact(args.path)}: {exc}") from None
    except SoundshardError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    found = {"path": redact(args.path), "reference_db": args.reference_db, **found}
    if args.json:
        print(json.dumps(found, indent=2))
    else:
        print(
            f"tone             {found['start_s']:.1f}-{found['end_s']:.1f} s, {found['level_dbfs']:.2f} dBFS "
            f"(holds within {found['spread_db']:.2f} dB; {found['tone_share']:.0%} of its energy at "
            f"{args.tone_hz:g} Hz)\n"
            f"offset           {found['offset_db']:.2f} dB  (--level-offset-db {found['offset_db']:.2f})"
        )
    if args.site:
        print(f"{args.site},{args.deployment or ''},{found['offset_db']:.2f}")
    return 0
