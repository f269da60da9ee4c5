"""``soundshard completion bash``: a bash completion script of every command and its flags.

soundshard completion bash > ~/.local/share/bash-completion/completions/soundshard
# or, for this shell only:  source <(soundshard completion bash)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from soundshard.pipelines.cli import COMMANDS, parser_of

PROG = "soundshard completion"


def flags_of(command: str) -> list[str]:
    """Every option string of ``command``'s parser (both spellings of a flag; not the hidden
    spellings of renamed flags)."""
    parser = parser_of(command)
    return sorted(
        {s for action in parser._actions if action.help != argparse.SUPPRESS for s in action.option_strings}
    )


def bash_script() -> str:
    """The completion function: commands first, then each command's flags; paths otherwise."""
    commands = [c for c in COMMANDS if c != "completion"]  # completion's own case is below
    cases = "\n".join(f'        {command}) opts="{" ".join(flags_of(command))}" ;;' for command in commands)
    return f"""# bash completion of soundshard (soundshard completion bash)
_soundshard() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" opts=""
    if [[ $COMP_CWORD -eq 1 ]]; then
        COMPREPLY=($(compgen -W "{" ".join(COMMANDS)} --help --version" -- "$cur"))
        return
    fi
    case "${{COMP_WORDS[1]}}" in
{cases}
        completion) opts="--help"
            [[ "$cur" != -* ]] && COMPREPLY=($(compgen -W "bash" -- "$cur")) && return ;;
    esac
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    else
        COMPREPLY=($(compgen -f -- "$cur"))
    fi
}}
complete -o filenames -F _soundshard soundshard
"""


def make_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """Argument parser of ``soundshard completion``."""
    parser = argparse.ArgumentParser(prog=prog, description="Print a shell completion script.")
    parser.add_argument("shell", choices=("bash",), help="The shell (bash; zsh reads it with bashcompinit).")
    return parser


def run(argv: Sequence[str] | None = None, *, prog: str = PROG) -> int:
    """Runs ``soundshard completion``; returns the exit code."""
    make_parser(prog).parse_args(argv)
    sys.stdout.write(bash_script())
    return 0
