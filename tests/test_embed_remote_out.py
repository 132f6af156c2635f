"""`--out` on an object store: the remote staging/switch path, through Beam FileSystems.

A test-only FileSystem registers the scheme ``shopvectest://`` over a local folder, so the code path that Dataflow
takes with ``gs://`` (no os.* calls on the output, report written last) runs here without a cloud.
"""
from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystem import MatchResult
from apache_beam.io.localfilesystem import LocalFileSystem

ROOT = {"dir": None}
SCHEME = "shopvectest"


def _loc(p: str) -> str:
    return os.path.join(ROOT["dir"], p[len(SCHEME) + 3:]) if p.startswith(f"{SCHEME}://") else p


def _uri(p: str) -> str:
    return f"{SCHEME}://" + os.path.relpath(p, ROOT["dir"])


class PrefixFileSystem(LocalFileSystem):
    @classmethod
    def scheme(cls):
        return SCHEME

    def join(self, base, *paths):
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in paths]])

    def split(self, path):
        head, _, tail = path.rstrip("/").rpartition("/")
        return head, tail

    def mkdirs(self, path):
        os.makedirs(_loc(path), exist_ok=True)

    def has_dirs(self):
        return False  # like an object store

    def match(self, patterns, limits=None):
        res = super().match([_loc(p) for p in patterns], limits)
        out = []
        for r in res:
            for m in r.metadata_list:
                m.path = _uri(m.path)
            out.append(MatchResult(_uri(r.pattern), r.metadata_list))
        return out

    def create(self, path, *a, **k):
        os.makedirs(os.path.dirname(_loc(path)), exist_ok=True)
        return super().create(_loc(path), *a, **k)

    def open(self, path, *a, **k):
        return super().open(_loc(path), *a, **k)

    def rename(self, src, dst):
        for d in dst:
            os.makedirs(os.path.dirname(_loc(d)), exist_ok=True)
        return super().rename([_loc(s) for s in src], [_loc(d) for d in dst])

    def exists(self, path):
        return super().exists(_loc(path))

    def delete(self, paths):
        import shutil

        for p in paths:
            loc = _loc(p)
            if os.path.isdir(loc):
                shutil.rmtree(loc)
            elif os.path.exists(loc):
                os.remove(loc)
            else:
                raise FileNotFoundError(p)


@pytest.fixture
def remote_root(tmp_path):
    ROOT["dir"] = str(tmp_path / "bucket")
    os.makedirs(ROOT["dir"])
    yield ROOT["dir"]
    ROOT["dir"] = None


def test_embed_to_an_object_store_uri(remote_root, demo_catalog, demo_config):
    from pipelines.embed import run_embed

    out = f"{SCHEME}://shop/out"
    report = run_embed(demo_config, demo_catalog["products"], None, out, runner="DirectRunner")
    local = os.path.join(remote_root, "shop", "out")
    emb = pq.read_table(os.path.join(local, "embeddings"))
    dl = pq.read_table(os.path.join(local, "dead_letters"))
    # without reviews, the demo's review-only product has no usable modality: one more dead letter
    assert emb.num_rows == report["counts"]["embedded"] == demo_catalog["n_unique_ids"] - 2
    assert dl.num_rows == report["counts"]["dead_letters"] == len(demo_catalog["bad"]) + 1
    on_disk = json.load(open(os.path.join(local, "run_report.json")))
    assert on_disk["created_at"] == report["created_at"]
    # nothing staged is left behind in the bucket; a second run replaces the parts
    assert sorted(os.listdir(os.path.join(remote_root, "shop"))) == ["out"]
    report2 = run_embed(demo_config, demo_catalog["products"], None, out, runner="DirectRunner")
    assert pq.read_table(os.path.join(local, "embeddings")).num_rows == emb.num_rows
    assert json.load(open(os.path.join(local, "run_report.json")))["created_at"] == report2["created_at"]
