"""Shared fixtures. Heavy fixtures are session-scoped so the Beam pipeline runs as few times as possible."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_CATALOG = REPO.parent / "shared" / "data" / "flipkart_1050" / "products.parquet"
DEMO_CONFIG = REPO / "configs" / "demo.toml"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logging.getLogger("apache_beam").setLevel(logging.WARNING)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end tests over a real catalog")


@pytest.fixture(scope="session")
def demo_catalog(tmp_path_factory):
    """The demo catalog (n=60, seed=0) with its bad records; dict from pipelines.demo_data.generate."""
    from pipelines.demo_data import generate

    out = tmp_path_factory.mktemp("demo_catalog")
    return generate(str(out), n=60, seed=0)


@pytest.fixture(scope="session")
def demo_config():
    from pipelines.config import load_config

    return load_config(str(DEMO_CONFIG))


@pytest.fixture(scope="session")
def demo_embeddings(tmp_path_factory, demo_catalog, demo_config):
    """One embed run over the demo catalog (products + reviews); returns (out_dir, report)."""
    from pipelines import handlers
    from pipelines.embed import run_embed

    handlers._CACHE.clear()  # a model cached by an earlier test in this process would hide this run's load count
    out = tmp_path_factory.mktemp("demo_out") / "out"
    report = run_embed(demo_config, demo_catalog["products"], demo_catalog["reviews"], str(out),
                       runner="DirectRunner")
    return str(out), report
