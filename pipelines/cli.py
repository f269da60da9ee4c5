"""The ``soundshard`` command.

Subcommands:
    demo      synthesise a small labelled set (with broken files) and run the features pipeline on it
    features  audio → log-mel windows → Parquet + TFRecord shards
    embed     audio → pretrained embeddings (OpenL3, SavedModel, TFLite) → Parquet + TFRecord shards
    train     train a classifier on feature shards (predefined folds, cross-validation)
    evaluate  evaluate a trained model on a fold or split
    tag       tag recordings with a trained model: window scores, file labels, events, summaries
    score     score a tag output against reference annotations (Audacity/Raven; sed_eval metrics)
    compile-edge  compile a trained model into a verified int8 TFLite artifact for a microcontroller
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: soundshard {demo,features,embed,train,evaluate,tag,score,compile-edge} [options]

  demo       synthesise a small labelled dataset and run the pipeline on it (no data needed)
  features   audio folders/globs/manifests -> log-mel windows -> Parquet + TFRecord shards
  embed      audio -> pretrained embeddings (OpenL3, SavedModel, TFLite) -> Parquet + TFRecord shards
  train      train a classifier on feature shards (predefined folds, cross-validation)
  evaluate   evaluate a trained model on a fold or split
  tag        tag recordings with a trained model: window scores, file labels, events, summaries
  score      score a tag output against reference annotations (Audacity/Raven): F1, error rate, AP
  compile-edge  compile a trained model into a verified int8 TFLite artifact for a microcontroller

Run 'soundshard COMMAND --help' for the options of a command; 'soundshard --version' for the version."""


def version() -> str:
    """The installed distribution's version."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("soundshard")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``soundshard`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"soundshard {version()}")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "features":
        from soundshard.pipelines import features

        return features.run(rest)
    if command == "embed":
        from soundshard.pipelines import embed

        return embed.run(rest)
    if command in ("train", "evaluate"):
        from soundshard.pipelines import train

        return train.run(rest) if command == "train" else train.run_evaluate(rest)
    if command == "tag":
        from soundshard.pipelines import tag

        return tag.run(rest)
    if command == "score":
        from soundshard.pipelines import score

        return score.run(rest)
    if command == "compile-edge":
        from soundshard.pipelines import compile_edge

        return compile_edge.run(rest)
    if command == "demo":
        from soundshard.pipelines import demo

        return demo.run(rest)
    print(f"soundshard: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
