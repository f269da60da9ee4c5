"""Dataflow Flex Template parameters of soundshard's pipelines, derived from their own parsers.

A template's parameters are the command's options, one per option, named as the option
without its dashes (the underscore spelling where there are two: ``--input-repr`` and
``--input_repr`` give ``input_repr``). Dataflow's launcher passes each as ``--name=value``;
:func:`template_argv` turns flags given as ``--name=true`` back into what argparse takes.

Regenerate the metadata files (``infra/flex/<command>.json``) after changing a command's
options::

    python infra/templates.py
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import pathlib
import re
import sys

#: soundshard commands with a Flex Template, and their modules (each has make_parser() and run()).
COMMANDS = {
    "features": "soundshard.pipelines.features",
    "embed": "soundshard.pipelines.embed",
    "tag": "soundshard.pipelines.tag",
}
#: Options every run of a command needs (it stops with a configuration error without them).
REQUIRED = {
    "features": ("input", "output"),
    "embed": ("input", "output"),
    "tag": ("input", "output", "model_dir"),
}
METADATA_DIR = pathlib.Path(__file__).resolve().parent / "flex"
NAME_PATTERN = re.compile(r"^[a-zA-Z][a-zA-Z0-9_]*$")
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


@dataclasses.dataclass(frozen=True)
class TemplateParameter:
    """One option of a command as a template parameter.

    Attributes:
        name: Parameter name (the option without dashes, underscore spelling).
        option: The option string the parser takes (``--name``).
        action: The parser's action.
    """

    name: str
    option: str
    action: argparse.Action

    @property
    def is_flag(self) -> bool:
        """True for options that take no value (``--incremental``)."""
        return self.action.nargs == 0


def command_module(command: str):
    """The pipeline module of ``command`` (raises KeyError naming the known commands)."""
    if command not in COMMANDS:
        raise KeyError(f"unknown command {command!r}; one of {', '.join(COMMANDS)}")
    return importlib.import_module(COMMANDS[command])


def template_parameters(parser: argparse.ArgumentParser) -> list[TemplateParameter]:
    """Every option the parser accepts, except ``--help`` and options hidden from its help."""
    parameters = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        if not action.option_strings:
            continue
        names = [o.lstrip("-") for o in action.option_strings if o.startswith("--")]
        underscore = [n for n in names if "-" not in n]
        name = (underscore or [n.replace("-", "_") for n in names])[0]
        option = f"--{name}" if f"--{name}" in action.option_strings else action.option_strings[0]
        parameters.append(TemplateParameter(name, option, action))
    return parameters


def template_argv(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` as the launcher passes it, with flags in the form argparse takes.

    ``--incremental=true`` becomes ``--incremental``, ``--incremental=false`` is dropped; other
    arguments pass unchanged (Beam's options too).

    Raises:
        ValueError: a flag given a value that is neither true nor false.
    """
    flags = {p.option: p for p in template_parameters(parser) if p.is_flag}
    for p in list(flags.values()):
        for option in p.action.option_strings:
            flags[option] = p
    out = []
    for arg in argv:
        option, sep, value = arg.partition("=")
        if sep and option in flags:
            if value.lower() in _TRUE:
                out.append(flags[option].option)
            elif value.lower() not in _FALSE:
                raise ValueError(f"{option} takes true or false, not {value!r}")
            continue
        out.append(arg)
    return out


def _regex(action: argparse.Action) -> str | None:
    if action.nargs == 0:
        return "^(true|false)$"
    if action.choices:
        return "^(" + "|".join(re.escape(str(c)) for c in action.choices) + ")$"
    if action.type is int:
        return "^-?[0-9]+$"
    if action.type is float:
        return r"^-?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$"
    return getattr(action.type, "pattern", None)  # a parser type that says what it accepts


def _help(action: argparse.Action, name: str) -> str:
    text = " ".join((action.help or "").split())
    if not text:
        return f"Feature config field {name} (schemas/config.py); overrides --config."
    if action.nargs == 0:
        text += " (true or false)"
    return text


def metadata(command: str) -> dict:
    """The Flex Template metadata of ``command``: name, description and one parameter per option."""
    module = command_module(command)
    parser = module.make_parser()
    summary = (module.__doc__ or "").strip().splitlines()[0]
    parameters = []
    for p in template_parameters(parser):
        entry = {
            "name": p.name,
            "label": p.name.replace("_", " "),
            "helpText": _help(p.action, p.name),
            "isOptional": p.name not in REQUIRED.get(command, ("input", "output")),
        }
        regex = _regex(p.action)
        if regex:
            entry["regexes"] = [regex]
        parameters.append(entry)
    return {
        "name": f"soundshard {command}",
        "description": summary,
        "streaming": False,
        "parameters": parameters,
    }


def write_metadata(commands=None, directory: pathlib.Path = METADATA_DIR) -> list[pathlib.Path]:
    """Writes ``<directory>/<command>.json`` for each command; returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for command in commands or COMMANDS:
        path = directory / f"{command}.json"
        path.write_text(json.dumps(metadata(command), indent=2, ensure_ascii=False) + "\n")
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write_metadata(sys.argv[1:] or None):
        print(path)
