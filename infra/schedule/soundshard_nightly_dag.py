"""Airflow DAG: soundshard's nightly incremental features run on Dataflow, with Beam's operator.

Needs ``apache-airflow-providers-apache-beam`` and ``apache-airflow-providers-google``, and
soundshard installed where the task runs (``pip install -c infra/constraints.txt <soundshard>``):
the operator builds the pipeline there and submits it; the workers run the image. Put this file
in the DAG folder with ``infra/flex_main.py`` and ``infra/templates.py`` beside it, and replace
the names below.

Each run processes the night that ends at its data interval's end (``--run_date``), so a re-run or
a backfill of a night writes that night's partition, and inputs already committed by any earlier
run are skipped (``--incremental``). ``max_active_runs=1``: only one run may write to an output
folder at a time. A failed run is retried; it resumes with what was not committed.
"""

import datetime
import os

from airflow import DAG
from airflow.providers.apache.beam.operators.beam import BeamRunPythonPipelineOperator
from airflow.providers.google.cloud.operators.dataflow import DataflowConfiguration

PROJECT = "my-project"
REGION = "europe-west1"
BUCKET = "gs://my-bucket"
IMAGE = "europe-west1-docker.pkg.dev/my-project/soundshard/soundshard:0.1.0"
#: infra/flex_main.py, copied beside this file: runs `soundshard features` with these options.
FLEX_MAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flex_main.py")

#: Options of `soundshard features` and of Beam's Dataflow runner (True: a flag).
PIPELINE_OPTIONS = {
    "input": "gs://sensors/**/*.flac",
    "output": f"{BUCKET}/features/night",
    "incremental": True,
    "site_pattern": "site=(?P<site>[^/]+)/",
    "run_date": "{{ data_interval_end | ds }}",
    "temp_location": f"{BUCKET}/tmp",
    "staging_location": f"{BUCKET}/staging",
    "sdk_container_image": IMAGE,
    "max_num_workers": 10,
    "machine_type": "n2-standard-4",
}

with DAG(
    dag_id="soundshard_nightly_features",
    schedule="0 3 * * *",
    start_date=datetime.datetime(2026, 11, 1, tzinfo=datetime.timezone.utc),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": datetime.timedelta(minutes=30)},
    tags=["soundshard"],
) as dag:
    BeamRunPythonPipelineOperator(
        task_id="features",
        runner="DataflowRunner",
        py_file=FLEX_MAIN,
        py_interpreter="python3",
        pipeline_options=PIPELINE_OPTIONS,
        dataflow_config=DataflowConfiguration(
            job_name="soundshard-nightly-features",
            project_id=PROJECT,
            location=REGION,
            wait_until_finished=True,
        ),
    )
