#!/usr/bin/env python3
"""Starts a soundshard pipeline on Dataflow: from its Flex Template, or directly from this machine.

::

    python infra/launch.py features --project my-project --region europe-west1 \\
        --bucket gs://my-bucket -- --input 'gs://sensors/**/*.flac' --output gs://my-bucket/night \\
        --incremental --site_pattern 'site=(?P<site>[^/]+)/'
    python infra/launch.py embed --mode direct --gpu nvidia-l4 --image IMAGE-gpu ... -- ...

Everything after ``--`` is the command's own flags, checked with its parser before anything is
started (a bad flag stops here, exit 2). ``--mode flex`` (default) runs ``gcloud dataflow
flex-template run`` on the template ``gs://BUCKET/templates/soundshard-COMMAND.json`` (see
``infra/README.md`` to build it): nothing but gcloud is needed here, and the command returns once
the job is submitted. ``--mode direct`` runs ``soundshard COMMAND ... --runner DataflowRunner``
with this script's Python (where soundshard is installed), waits for the job and prints its
summary; the exit status is the command's (for cron and schedulers). ``--print`` prints the
command instead of running it.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import templates  # noqa: E402 - beside this file

#: GPUs and the machine types they come with on Dataflow (the first is the default).
GPU_MACHINES = {
    "nvidia-l4": "g2-standard-8",
    "nvidia-tesla-t4": "n1-standard-8",
    "nvidia-tesla-a100": "a2-highgpu-1g",
}
DEFAULT_MACHINE = "n2-standard-4"
#: Delimiters gcloud accepts for a dict flag (``^~^k=v~k=v``); the first not used in any value.
_DELIMITERS = "~|#@!%;"
_JOB_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def make_parser() -> argparse.ArgumentParser:
    """Options of this script (the pipeline's own flags follow ``--``)."""
    parser = argparse.ArgumentParser(
        prog="launch.py", description=__doc__.split("\n", 1)[0], allow_abbrev=False
    )
    parser.add_argument("command", choices=sorted(templates.COMMANDS))
    parser.add_argument("--mode", choices=("flex", "direct"), default="flex")
    parser.add_argument("--project", required=True)
    parser.add_argument("--region", required=True)
    parser.add_argument("--bucket", required=True, help="gs://BUCKET for temp/, staging/ and templates/.")
    parser.add_argument(
        "--image",
        help="Worker image (direct mode: required; flex mode: default the template's own image).",
    )
    parser.add_argument(
        "--template", help="Template spec (default gs://BUCKET/templates/soundshard-COMMAND.json)."
    )
    parser.add_argument("--job-name", help="Default: soundshard-COMMAND-<UTC time>.")
    parser.add_argument("--max-workers", type=int, default=10)
    parser.add_argument("--machine-type", help=f"Default {DEFAULT_MACHINE}, or the GPU's machine type.")
    parser.add_argument(
        "--gpu",
        metavar="TYPE[:COUNT]",
        help=f"Attach GPUs to every worker ({', '.join(GPU_MACHINES)}); for `embed` with a GPU image.",
    )
    parser.add_argument("--service-account", help="Worker service account e-mail.")
    parser.add_argument("--print", action="store_true", help="Print the command instead of running it.")
    return parser


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """This script's arguments and the pipeline's (after the first ``--``)."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def check_pipeline_args(command: str, pipeline_args: list[str]) -> list[str]:
    """Parses the pipeline flags with the command's parser; returns the Beam flags among them.

    Raises:
        SystemExit: (from argparse) on a malformed flag.
        ConfigError: a flag that neither the command nor Beam knows.
    """
    from soundshard.pipelines import runner

    parser = templates.command_module(command).make_parser()
    _, beam_args = parser.parse_known_args(pipeline_args)
    runner.check_beam_args(beam_args)
    return beam_args


def gpu_service_option(gpu: str) -> str:
    """Dataflow's service option that attaches ``TYPE[:COUNT]`` GPUs and installs the driver."""
    kind, _, count = gpu.partition(":")
    if kind not in GPU_MACHINES:
        raise ValueError(f"--gpu {kind!r}: one of {', '.join(GPU_MACHINES)}")
    return f"worker_accelerator=type:{kind};count:{int(count or 1)};install-nvidia-driver"


def template_parameters(command: str, pipeline_args: list[str]) -> tuple[dict[str, str], list[str]]:
    """Pipeline flags as template parameters, and the Beam flags (``--name=value``) among them.

    Raises:
        ValueError: a Beam flag not in ``--name=value`` form.
    """
    parser = templates.command_module(command).make_parser()
    params = {}
    by_option = {}
    for p in templates.template_parameters(parser):
        for option in p.action.option_strings:
            by_option[option] = p
    beam = []
    args = list(pipeline_args)
    while args:
        arg = args.pop(0)
        option, sep, value = arg.partition("=")
        p = by_option.get(option)
        if p is None:
            if not sep:
                raise ValueError(f"give Beam options to a template as --name=value, not {arg!r}")
            beam.append(arg)
        elif p.is_flag:
            params[p.name] = "true"
        else:
            params[p.name] = value if sep else args.pop(0)
    return params, beam


def gcloud_dict(values: dict[str, str]) -> str:
    """``values`` as a gcloud dict flag value, with a delimiter that occurs in none of them."""
    text = "".join(f"{k}{v}" for k, v in values.items())
    delimiter = next((d for d in _DELIMITERS if d not in text), None)
    if delimiter is None:
        raise ValueError(f"no gcloud delimiter ({_DELIMITERS}) is free in the parameters")
    return f"^{delimiter}^" + delimiter.join(f"{k}={v}" for k, v in values.items())


def build_command(
    options: argparse.Namespace, pipeline_args: list[str], *, now: float | None = None
) -> list[str]:
    """The command that starts the job (``gcloud ...``, or ``python -m soundshard.pipelines.cli ...``)."""
    bucket = options.bucket.rstrip("/")
    if not bucket.startswith("gs://"):
        raise ValueError(f"--bucket {options.bucket!r} is not a gs:// URL")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    job_name = options.job_name or f"soundshard-{options.command}-{stamp}"
    if not _JOB_NAME.match(job_name):
        raise ValueError(f"--job-name {job_name!r}: lower-case letters, digits and '-', from a letter on")
    service_options = [gpu_service_option(options.gpu)] if options.gpu else []
    machine = options.machine_type or (
        GPU_MACHINES[options.gpu.partition(":")[0]] if options.gpu else DEFAULT_MACHINE
    )
    check_pipeline_args(options.command, pipeline_args)
    if options.mode == "direct":
        if not options.image:
            raise ValueError("--mode direct needs --image (the worker container)")
        command = [sys.executable, "-m", "soundshard.pipelines.cli", options.command, *pipeline_args]
        command += ["--runner", "DataflowRunner"]
        command += ["--project", options.project, "--region", options.region, "--job_name", job_name]
        command += ["--temp_location", f"{bucket}/tmp", "--staging_location", f"{bucket}/staging"]
        command += ["--sdk_container_image", options.image, "--max_num_workers", str(options.max_workers)]
        command += ["--machine_type", machine]
        if options.service_account:
            command += ["--service_account_email", options.service_account]
        for option in service_options:
            command.append(f"--dataflow_service_options={option}")
        return command
    params, beam_args = template_parameters(options.command, pipeline_args)
    if options.image:
        beam_args.append(f"--sdk_container_image={options.image}")
    beam_args += [f"--dataflow_service_options={option}" for option in service_options]
    template = options.template or f"{bucket}/templates/soundshard-{options.command}.json"
    command = ["gcloud", "dataflow", "flex-template", "run", job_name, "--project", options.project]
    command += ["--region", options.region, "--template-file-gcs-location", template]
    command += ["--temp-location", f"{bucket}/tmp", "--staging-location", f"{bucket}/staging"]
    command += ["--max-workers", str(options.max_workers), "--worker-machine-type", machine]
    if options.service_account:
        command += ["--service-account-email", options.service_account]
    if beam_args:
        extra = {a.partition("=")[0].lstrip("-"): a.partition("=")[2] for a in beam_args}
        command += ["--additional-pipeline-options", gcloud_dict(extra)]
    command += ["--parameters", gcloud_dict(params)]
    return command


def main(argv: list[str] | None = None) -> int:
    """Builds the command and runs (or prints) it; returns its exit status."""
    own, pipeline_args = split_argv(list(sys.argv[1:] if argv is None else argv))
    options = make_parser().parse_args(own)
    try:
        command = build_command(options, pipeline_args)
    except Exception as exc:  # noqa: BLE001 - configuration errors of every kind end here
        print(f"launch.py: error: {exc}", file=sys.stderr)
        return 2
    if options.print:
        print(shlex.join(command))
        return 0
    return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main())
