#!/usr/bin/env python3
"""Beam's SDK container contract without Docker: install the job's staged packages, run the harness.

Beam's Python SDK container starts every worker with its ``boot`` program: it asks the runner's
provision service for the pipeline options and the job's staged files, installs the packages
among them (``--extra_package``, ``--setup_file``, ``--requirements_file``) and starts
``apache_beam.runners.worker.sdk_worker_main``. This script does the same in Python, for
worker hosts that run Beam's worker pool from a virtual environment instead of a container
(Flink or Spark task managers, a test)::

    python -m apache_beam.runners.worker.worker_pool_main --service_port 50000 \\
        --container_executable /opt/soundshard/infra/worker_boot.py

and jobs submitted with ``--environment_type EXTERNAL --environment_config HOST:50000
--extra_package soundshard-0.1.0-py3-none-any.whl``. The environment needs soundshard's
dependencies (``pip install -r infra/constraints.txt``); soundshard itself comes with the job,
so every job runs the code it was submitted with. The worker pool runs this file directly: keep
it executable (``chmod +x``), with a ``python3`` on ``PATH`` that has those dependencies.

Each worker gets its own folder, ``soundshard-worker-<id>`` in ``--semi_persist_dir`` (default
``$TMPDIR``): staged files in ``staged/``, packages installed with
``pip install --target site/`` (the environment itself is never changed), and the worker's log,
``worker-<id>.log``: Beam's worker pool keeps its workers' stdout in a pipe it never reads, so all
output goes to that file (``SOUNDSHARD_WORKER_LOG_DIR`` puts the logs elsewhere). The log names
the files soundshard was imported from.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import runpy
import shutil
import subprocess
import sys
import tempfile

# Names the Beam stager gives staged files (apache_beam/runners/portability/stager.py).
EXTRA_PACKAGES_FILE = "extra_packages.txt"
REQUIREMENTS_FILE = "requirements.txt"
WORKFLOW_TARBALL_FILE = "workflow.tar.gz"

_LOG = logging.getLogger("soundshard.worker_boot")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The flags of the container contract (https://s.apache.org/beam-fn-api-container-contract)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--id", required=True, help="Worker id.")
    parser.add_argument("--logging_endpoint", required=True)
    parser.add_argument("--artifact_endpoint", required=True)
    parser.add_argument("--provision_endpoint", required=True)
    parser.add_argument("--control_endpoint", required=True)
    parser.add_argument(
        "--semi_persist_dir", default=None, help="Folder for the worker's own folder (default: $TMPDIR)."
    )
    args, _ = parser.parse_known_args(argv)
    return args


def _redirect_output(path: str) -> None:
    """Sends this process's stdout and stderr (and its children's) to ``path``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def provision_info(endpoint: str, worker_id: str):
    """The runner's ProvisionInfo for this worker (pipeline options, staged files, endpoints)."""
    import grpc
    from apache_beam.portability.api import beam_provision_api_pb2, beam_provision_api_pb2_grpc

    with grpc.insecure_channel(endpoint) as channel:
        stub = beam_provision_api_pb2_grpc.ProvisionServiceStub(channel)
        request = beam_provision_api_pb2.GetProvisionInfoRequest()
        return stub.GetProvisionInfo(request, metadata=[("worker_id", worker_id)]).info


def retrieve_artifacts(endpoint: str, dependencies, staged_dir: str) -> list[str]:
    """Fetches every staged file through the artifact retrieval API into ``staged_dir``.

    Returns:
        The staged names (``extra_packages.txt``, ``soundshard-0.1.0-py3-none-any.whl``, ...).
    """
    import grpc
    from apache_beam.portability import common_urns
    from apache_beam.portability.api import (
        beam_artifact_api_pb2,
        beam_artifact_api_pb2_grpc,
        beam_runner_api_pb2,
    )

    os.makedirs(staged_dir, exist_ok=True)
    names = []
    with grpc.insecure_channel(endpoint) as channel:
        stub = beam_artifact_api_pb2_grpc.ArtifactRetrievalServiceStub(channel)
        resolved = stub.ResolveArtifacts(
            beam_artifact_api_pb2.ResolveArtifactsRequest(artifacts=list(dependencies))
        ).replacements
        for artifact in resolved:
            if artifact.role_urn != common_urns.artifact_roles.STAGING_TO.urn:
                _LOG.info("skipping artifact with role %s", artifact.role_urn)
                continue
            payload = beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(artifact.role_payload)
            name = os.path.basename(payload.staged_name)
            with open(os.path.join(staged_dir, name), "wb") as out:
                request = beam_artifact_api_pb2.GetArtifactRequest(artifact=artifact)
                for chunk in stub.GetArtifact(request):
                    out.write(chunk.data)
            names.append(name)
    return names


def _pip(*args: str) -> None:
    command = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", *args]
    _LOG.info("running %s", " ".join(command))
    subprocess.run(command, check=True)


def install_staged(staged_dir: str, names: list[str], site_dir: str) -> list[str]:
    """Installs the staged packages into ``site_dir`` as the SDK container's boot does.

    Requirements first (from the staged cache, then the index), then every package named in
    ``extra_packages.txt`` and the ``--setup_file`` tarball, these without their dependencies:
    the environment provides those, and a job's package must not replace them.

    Returns:
        What was installed (file names).
    """
    installed = []
    os.makedirs(site_dir, exist_ok=True)
    if REQUIREMENTS_FILE in names:
        requirements = os.path.join(staged_dir, REQUIREMENTS_FILE)
        _pip("--target", site_dir, "--find-links", staged_dir, "-r", requirements)
        installed.append(REQUIREMENTS_FILE)
    packages = []
    if EXTRA_PACKAGES_FILE in names:
        with open(os.path.join(staged_dir, EXTRA_PACKAGES_FILE)) as f:
            packages = [line.strip() for line in f if line.strip()]
    if WORKFLOW_TARBALL_FILE in names:
        packages.append(WORKFLOW_TARBALL_FILE)
    missing = [p for p in packages if p not in names]
    if missing:
        raise FileNotFoundError(f"staged package(s) {missing} are listed but were not staged")
    if packages:
        _pip("--no-deps", "--upgrade", "--target", site_dir, *[os.path.join(staged_dir, p) for p in packages])
        installed += packages
    return installed


def harness_environment(info, args: argparse.Namespace, semi_persist_dir: str) -> dict[str, str]:
    """The environment variables ``sdk_worker_main`` reads (as Beam's boot sets them)."""
    from apache_beam.portability.api import endpoints_pb2
    from google.protobuf import json_format, text_format

    def descriptor(url: str) -> str:
        return text_format.MessageToString(endpoints_pb2.ApiServiceDescriptor(url=url))

    env = {
        "WORKER_ID": args.id,
        "PIPELINE_OPTIONS": json_format.MessageToJson(info.pipeline_options),
        "SEMI_PERSISTENT_DIRECTORY": semi_persist_dir,
        "LOGGING_API_SERVICE_DESCRIPTOR": descriptor(args.logging_endpoint),
        "CONTROL_API_SERVICE_DESCRIPTOR": descriptor(args.control_endpoint),
        "RUNNER_CAPABILITIES": " ".join(info.runner_capabilities),
    }
    if info.HasField("status_endpoint"):
        env["STATUS_API_SERVICE_DESCRIPTOR"] = text_format.MessageToString(info.status_endpoint)
    return env


def soundshard_origin() -> dict[str, str]:
    """Where this interpreter imports soundshard's packages from (``{}`` when it cannot)."""
    import importlib

    origin = {}
    for name in ("soundshard.pipelines", "soundshard.transforms", "soundshard.schemas"):
        try:
            origin[name] = os.path.dirname(importlib.import_module(name).__file__)
        except ImportError:
            pass
    return origin


def main(argv: list[str] | None = None) -> None:
    """Boots one SDK worker; returns only when the harness ends."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # A folder of this worker's own inside the given one (which may be /tmp itself).
    semi_persist_dir = os.path.join(
        args.semi_persist_dir or tempfile.gettempdir(), f"soundshard-worker-{args.id}"
    )
    shutil.rmtree(semi_persist_dir, ignore_errors=True)  # a restarted worker starts clean
    os.makedirs(semi_persist_dir)
    log_dir = os.environ.get("SOUNDSHARD_WORKER_LOG_DIR") or semi_persist_dir
    os.makedirs(log_dir, exist_ok=True)
    _redirect_output(os.path.join(log_dir, f"worker-{args.id}.log"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _LOG.info("booting worker %s in %s", args.id, semi_persist_dir)

    info = provision_info(args.provision_endpoint, args.id)
    staged_dir = os.path.join(semi_persist_dir, "staged")
    names = retrieve_artifacts(args.artifact_endpoint, info.dependencies, staged_dir)
    _LOG.info("staged files: %s", ", ".join(names) or "none")
    site_dir = os.path.join(semi_persist_dir, "site")
    installed = install_staged(staged_dir, names, site_dir)
    _LOG.info("installed: %s", ", ".join(installed) or "nothing")

    # The job's packages come first, before the environment's own site-packages.
    sys.path.insert(0, site_dir)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [site_dir, os.environ.get("PYTHONPATH")]))
    os.environ.update(harness_environment(info, args, semi_persist_dir))
    _LOG.info("soundshard imported from %s", json.dumps(soundshard_origin()))
    sys.argv = ["sdk_worker_main"]
    runpy.run_module("apache_beam.runners.worker.sdk_worker_main", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
