"""Program of soundshard's Dataflow Flex Templates (the image's ``FLEX_TEMPLATE_PYTHON_PY_FILE``).

Dataflow's template launcher runs it with the template's parameters as ``--name=value`` plus the
job's pipeline options (``--runner``, ``--project``, ``--template_location``, ...). It runs the
command named by ``SOUNDSHARD_COMMAND`` (``features``, ``embed`` or ``tag``; set when the image
is built) as ``soundshard <command>`` would, with three adjustments:

- flags given as ``--incremental=true`` are passed as ``--incremental`` (``=false``: left out);
- without ``--sdk_container_image``, the workers use this image (``SOUNDSHARD_IMAGE``, also set
  when the image is built), so workers run the code the job was built with;
- the job is only written, to ``--template_location`` for the launcher to start: the command
  stops there with exit status 0 instead of waiting for the job (``runner.run_remote``).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import templates  # noqa: E402 - beside this file, in the image and in the repository


def launch_argv(command: str, argv: list[str], environ=os.environ) -> list[str]:
    """The command's arguments for a launch with the launcher's ``argv``.

    Raises:
        ValueError: a flag with a value other than true or false, or no worker image known.
    """
    parser = templates.command_module(command).make_parser()
    args = templates.template_argv(parser, argv)
    if not any(a == "--runner" or a.startswith("--runner=") for a in args):
        args.append("--runner=DataflowRunner")
    given = any(a == "--sdk_container_image" or a.startswith("--sdk_container_image=") for a in args)
    if not given:
        image = environ.get("SOUNDSHARD_IMAGE")
        if not image:
            raise ValueError(
                "no worker image: pass sdk_container_image, or build the image with "
                "--build-arg SOUNDSHARD_IMAGE=<its own name>"
            )
        args.append(f"--sdk_container_image={image}")
    return args


def main(argv: list[str] | None = None, environ=os.environ) -> int:
    """Runs the image's command with the launcher's arguments; returns the exit status."""
    command = environ.get("SOUNDSHARD_COMMAND", "features")
    try:
        args = launch_argv(command, list(sys.argv[1:] if argv is None else argv), environ)
    except (KeyError, ValueError) as exc:
        print(f"soundshard {command}: error: {exc}", file=sys.stderr)
        return 2
    return templates.command_module(command).run(args)


if __name__ == "__main__":
    sys.exit(main())
