"""Airflow DAG running ``shopvec nightly`` every night (Airflow 2.4+ and 3.x).

Copy this file into the DAGs folder and set the Airflow Variables (defaults in brackets):
``shopvec_home`` (the checkout with its ``.venv``) [/opt/shopvec], ``shopvec_nightly_config`` (the nightly TOML)
[/etc/shopvec/nightly.toml].

Exit-code contract of ``shopvec nightly`` and how the task maps it:
0 published or nothing to do -> success; 75 another run holds the lock -> skipped (the running one reports);
1 a stage failed, 2 bad config, 3 a quality gate refused (CURRENT untouched) -> task failure (alert via Airflow's
failure callbacks / email). The task log holds the one-screen summary (stdout) and the progress log (stderr); the
JSON report is ``<state_dir>/nightly_report.json`` and its path is pushed to XCom (the command's last line).
"""
from __future__ import annotations

import datetime as dt

from airflow import DAG

try:  # Airflow 3: operators live in the standard provider
    from airflow.providers.standard.operators.bash import BashOperator
except ImportError:  # Airflow 2.x
    from airflow.operators.bash import BashOperator

# Airflow Variables are read when the task runs (Jinja), not when the scheduler parses this file.
HOME = "{{ var.value.get('shopvec_home', '/opt/shopvec') }}"
CONFIG = "{{ var.value.get('shopvec_nightly_config', '/etc/shopvec/nightly.toml') }}"
EXIT_LOCKED = 75

NIGHTLY_CMD = f"""
set -uo pipefail
cd "{HOME}"
"{HOME}/.venv/bin/shopvec" nightly --config "{CONFIG}" --report "$AIRFLOW_TMP_REPORT"
rc=$?
echo "shopvec nightly exit code: $rc (0 published/no change, 1 stage failed, 2 bad config, 3 gate refused, 75 locked)" >&2
[ -f "$AIRFLOW_TMP_REPORT" ] && echo "$AIRFLOW_TMP_REPORT"
exit $rc
"""

default_args = {
    "owner": "search-platform",
    "retries": 1,  # a retry after a stage failure resumes from the last trusted checkpoint
    "retry_delay": dt.timedelta(minutes=15),
    "execution_timeout": dt.timedelta(hours=6),
}

with DAG(
    dag_id="shopvec_nightly",
    description="shopvec: incremental re-embed, index, quality gates, atomic publish",
    schedule="15 2 * * *",
    start_date=dt.datetime(2025, 1, 1),
    catchup=False,
    max_active_runs=1,  # the job's own lock is the real guard; this keeps Airflow from queueing overlaps
    default_args=default_args,
    tags=["shopvec", "embeddings", "faiss"],
) as dag:
    nightly = BashOperator(
        task_id="shopvec_nightly",
        bash_command=NIGHTLY_CMD,
        env={"AIRFLOW_TMP_REPORT": "/tmp/shopvec_nightly_report_{{ ts_nodash }}.json",
             "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"},
        append_env=True,
        skip_on_exit_code=EXIT_LOCKED,
        do_xcom_push=True,
    )
