"""Scheduling examples under deploy/: cron (wrapper run for real), systemd units, the Airflow DAG (skips w/o Airflow)."""
from __future__ import annotations

import configparser
import importlib.util
import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(REPO, "deploy")


def test_cron_file_schedules_the_wrapper():
    lines = [ln for ln in open(os.path.join(DEPLOY, "cron", "shopvec-nightly")).read().splitlines()
             if ln.strip() and not ln.startswith("#") and "=" not in ln.split()[0]]
    assert len(lines) == 1
    fields = lines[0].split()
    minute, hour, dom, month, dow, user, cmd = fields[:7]
    assert re.fullmatch(r"\d{1,2}", minute) and re.fullmatch(r"\d{1,2}", hour) and (dom, month, dow) == ("*",) * 3
    assert user and cmd.endswith("deploy/cron/shopvec-nightly.sh")


@pytest.mark.skipif(not os.path.exists(os.path.join(REPO, ".venv", "bin", "shopvec")),
                    reason="needs the installed .venv/bin/shopvec")
def test_cron_wrapper_logs_and_passes_the_exit_code_through(tmp_path):
    bad = tmp_path / "nightly.toml"
    bad.write_text('[nightly]\nproducts = "/nonexistent/products.parquet"\n')  # no state_dir: a config error
    env = dict(os.environ, SHOPVEC_HOME=REPO, SHOPVEC_CONFIG=str(bad), SHOPVEC_LOG_DIR=str(tmp_path / "log"))
    p = subprocess.run(["bash", os.path.join(DEPLOY, "cron", "shopvec-nightly.sh")], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2  # bad config / input: shopvec's exit code, unchanged
    assert "FAILED with exit 2" in p.stdout  # the one line cron mails
    logs = list((tmp_path / "log").glob("nightly-*.log"))
    assert len(logs) == 1
    text = logs[0].read_text()
    assert "state_dir is required" in text and "exit 2" in text


def test_systemd_units():
    svc = configparser.ConfigParser(strict=False, interpolation=None)
    svc.read(os.path.join(DEPLOY, "systemd", "shopvec-nightly.service"))
    s = svc["Service"]
    assert s["Type"] == "oneshot"
    assert re.search(r"/shopvec nightly --config \S+\.toml$", s["ExecStart"])
    assert s["SuccessExitStatus"].split() == ["75"]
    assert s["StandardOutput"] == "journal" and s["StandardError"] == "journal"
    timer = configparser.ConfigParser(strict=False, interpolation=None)
    timer.read(os.path.join(DEPLOY, "systemd", "shopvec-nightly.timer"))
    assert timer["Timer"]["Unit"] == "shopvec-nightly.service"
    assert timer["Timer"]["Persistent"] == "true" and timer["Timer"]["OnCalendar"]
    assert timer["Install"]["WantedBy"] == "timers.target"


def test_airflow_dag_imports():
    pytest.importorskip("airflow", reason="Airflow is not installed")
    spec = importlib.util.spec_from_file_location("shopvec_nightly_dag",
                                                  os.path.join(DEPLOY, "airflow", "shopvec_nightly_dag.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    dag = mod.dag
    assert dag.dag_id == "shopvec_nightly" and dag.max_active_runs == 1
    task = dag.get_task("shopvec_nightly")
    assert "shopvec\" nightly --config" in task.bash_command
    assert 75 in (task.skip_on_exit_code if isinstance(task.skip_on_exit_code, (list, tuple, set))
                  else [task.skip_on_exit_code])
