"""The ``soundshard`` command.

Subcommands:
    demo      synthesise a small labelled set (with broken files) and run the features pipeline on it
    features  audio → log-mel windows → Parquet + TFRecord shards
    embed     audio → pretrained embeddings (OpenL3, SavedModel, TFLite) → Parquet + TFRecord shards
    train     train a classifier on feature shards (predefined folds, cross-validation)
    evaluate  evaluate a trained model on a fold or split
    tag       tag recordings with a trained model: window scores, file labels, events, summaries
    listen    tag a live stream (standard input, a file) with a trained model
    score     score a tag output against reference annotations (Audacity/Raven; sed_eval metrics)
    info      what a features/embedding output, a model folder or a tag output holds
    calibrate a sensor's calibration offset from a recording of a sound calibrator
    config    a commented template of every feature setting, or a config file checked
    completion  a bash completion script of every command and flag
    compile-edge  compile a trained model into a verified int8 TFLite artifact for a microcontroller
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence

USAGE = """usage: soundshard COMMAND [options]

  demo       synthesise a small labelled dataset and run the pipeline on it (no data needed)
  features   audio folders/globs/manifests -> log-mel windows -> Parquet + TFRecord shards
  embed      audio -> pretrained embeddings (OpenL3, SavedModel, TFLite) -> Parquet + TFRecord shards
  train      train a classifier on feature shards (predefined folds, cross-validation)
  evaluate   evaluate a trained model on a fold or split
  tag        tag recordings with a trained model: window scores, file labels, events, summaries
  listen     tag a live stream (standard input, a file) as it arrives: events printed as they close
  score      score a tag output against reference annotations (Audacity/Raven): F1, error rate, AP
  info       what a features/embedding output, a model folder or a tag output holds
  calibrate  a sensor's calibration offset (dB SPL of 0 dBFS) from a sound calibrator's recording
  config     a commented template of every feature setting (--defaults), or a file checked (--check)
  compile-edge  compile a trained model into a verified int8 TFLite artifact for a microcontroller
  completion bash  a bash completion script (source <(soundshard completion bash))

Run 'soundshard COMMAND --help' for the options of a command; 'soundshard --version' for the version."""


#: Each command: the module under ``soundshard.pipelines`` that runs it, its run function, and the
#: ``module.function`` that builds its argument parser (the pipeline commands' parsers are built in
#: ``arguments`` without Beam). Modules are imported only when a command runs or shows its help.
COMMANDS = {
    "demo": ("demo", "run", "demo.make_parser"),
    "features": ("features", "run", "arguments.features_parser"),
    "embed": ("embed", "run", "arguments.embed_parser"),
    "train": ("train", "run", "train.make_parser"),
    "evaluate": ("train", "run_evaluate", "train.make_evaluate_parser"),
    "tag": ("tag", "run", "arguments.tag_parser"),
    "listen": ("listen", "run", "listen.make_parser"),
    "score": ("score", "run", "score.make_parser"),
    "info": ("info", "run", "info.make_parser"),
    "calibrate": ("calibrate", "run", "calibrate.make_parser"),
    "config": ("configs", "run", "configs.make_parser"),
    "compile-edge": ("compile_edge", "run", "compile_edge.make_parser"),
    "completion": ("completion", "run", "completion.make_parser"),
}


#: Commands whose flags outside their own parser go to Beam (``--runner``, ``--project``, ...).
BEAM_COMMANDS = ("demo", "features", "embed", "tag")


def unknown_option(command: str, rest: Sequence[str]) -> str | None:
    """The error line for the first option in ``rest`` that neither the command nor (for
    :data:`BEAM_COMMANDS`) Beam knows, with the closest known spelling; ``None`` when all are known."""
    known = set(parser_of(command)._option_string_actions)
    names = [token.split("=", 1)[0] for token in rest if token.startswith("--") and token != "--"]
    unknown = [name for name in names if name not in known]
    if not unknown:
        return None
    beam: set[str] = set()
    if command in BEAM_COMMANDS:
        from soundshard.pipelines.runner import beam_option_names

        beam = beam_option_names()
        unknown = [name for name in unknown if name not in beam]
    if not unknown:
        return None
    name = unknown[0]
    close = difflib.get_close_matches(name, sorted(known | beam), n=1, cutoff=0.75)
    hint = f"; did you mean {close[0]}?" if close else f" (see soundshard {command} --help)"
    return f"soundshard {command}: error: unrecognized option {name}{hint}"


def parser_of(command: str):
    """The argument parser ``command`` runs with."""
    module, function = COMMANDS[command][2].rsplit(".", 1)
    return getattr(importlib.import_module(f"soundshard.pipelines.{module}"), function)(
        f"soundshard {command}"
    )


def version() -> str:
    """The installed distribution's version (``soundshard.__version__``)."""
    import soundshard

    return soundshard.__version__


@contextlib.contextmanager
def native_stderr_aside() -> Iterator[str]:
    """Native libraries' writes to the process's stderr (TensorFlow's and absl's start-up lines,
    CUDA probes on machines without a GPU, LiteRT's delegate notice) go to a log file, yielded;
    Python's ``sys.stderr`` (soundshard's messages, progress, warnings, tracebacks) stays on the
    terminal. Child processes inherit the redirection."""
    sys.stderr.flush()
    fd, path = tempfile.mkstemp(prefix="soundshard-", suffix=".log")
    terminal = os.dup(2)
    python_stderr = sys.stderr
    sys.stderr = os.fdopen(os.dup(terminal), "w", buffering=1, errors="backslashreplace")
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield path
    finally:
        sys.stderr.flush()
        os.dup2(terminal, 2)
        os.close(terminal)
        sys.stderr.close()
        sys.stderr = python_stderr


def console() -> int:
    """The console script: :func:`main`, with native libraries' stderr chatter kept in a log
    file (shown again with ``--verbose``; its path printed when the command fails)."""
    argv = sys.argv[1:]
    if "--verbose" in argv or not _is_fd(sys.stderr):
        return main(argv)
    code = 1
    with native_stderr_aside() as log:
        try:
            code = main(argv)
        except BrokenPipeError:  # the reader went away (`soundshard ... | head`): nothing to say
            sys.stdout = None  # no flush of the closed pipe at exit
            code = 0
        finally:
            failed = code not in (0, 2)
            if failed and os.path.getsize(log):
                print(f"soundshard: library messages of this run are in {log}", file=sys.stderr)
    if not failed:
        os.unlink(log)
    return code


def _is_fd(stream) -> bool:
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """Runs a ``soundshard`` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"soundshard {version()}")
        return 0
    command, rest = argv[0], argv[1:]
    if command in COMMANDS:
        if "-h" in rest or "--help" in rest:  # from the parser alone: no pipeline module imported
            try:
                parser_of(command).parse_known_args(rest)  # prints the help and exits
            except SystemExit as exc:
                return int(exc.code or 0)
        problem = unknown_option(command, rest)
        if problem is not None:
            print(problem, file=sys.stderr)
            return 2
        module, run, _ = COMMANDS[command]
        return getattr(importlib.import_module(f"soundshard.pipelines.{module}"), run)(rest)
    close = difflib.get_close_matches(command, list(COMMANDS), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    print(f"soundshard: unknown command {command!r}{hint}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(console())
