"""``soundshard config``: a commented template of every feature setting, and a config file
checked and resolved.

    soundshard config --defaults > features.toml    # every setting, its meaning and default
    soundshard config --check features.toml         # the values it gives, and their fingerprint
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence

from soundshard.schemas.config import FeatureConfig, attribute_docs, load_feature_config
from soundshard.schemas.errors import ConfigError

PROG = "soundshard config"


def make_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """Argument parser of ``soundshard config``."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Feature config files: a template of every setting, or a file checked."
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--defaults", action="store_true", help="Print a commented TOML file of every setting at its default."
    )
    what.add_argument(
        "--check", metavar="FILE", help="Check a TOML or JSON config file; print the values it resolves to."
    )
    return parser


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def defaults_toml() -> str:
    """Every FeatureConfig field, with its description and default, as a ``[features]`` table
    that ``--config`` reads (fields whose default is "none" are commented out)."""
    docs = attribute_docs(FeatureConfig)
    lines = [
        "# soundshard feature config: `soundshard features --config FILE` (also embed's and tag's).",
        "# Every setting is at its default; change what you need. Flags of the same name override it.",
        f"# Default fingerprint: {FeatureConfig().fingerprint}",
        "",
        "[features]",
    ]
    for field in dataclasses.fields(FeatureConfig):
        lines.append("")
        lines += [f"# {line}" for line in _wrapped(docs.get(field.name, ""))]
        if field.default is None:
            lines.append(f"# {field.name} = ...  (unset: none)")
        else:
            lines.append(f"{field.name} = {_toml_value(field.default)}")
    return "\n".join(lines) + "\n"


def _wrapped(text: str, width: int = 96) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=width) or [""]


def run(argv: Sequence[str] | None = None, *, prog: str = PROG) -> int:
    """Runs ``soundshard config``; returns the exit code (2 for a config file with a bad value)."""
    args = make_parser(prog).parse_args(argv)
    if args.defaults:
        sys.stdout.write(defaults_toml())
        return 0
    try:
        config = load_feature_config(args.check)
    except ConfigError as exc:
        print(f"{prog}: error: {args.check}: {exc}", file=sys.stderr)
        return 2
    default = FeatureConfig()
    for field in dataclasses.fields(FeatureConfig):
        value = getattr(config, field.name)
        changed = "" if value == getattr(default, field.name) else "   (changed)"
        print(f"{field.name:<20} {value!r}{changed}")
    print(f"{'fingerprint':<20} {config.fingerprint}")
    return 0
