"""index.embeddings_io: reading the embed pipeline's output, validation errors, the write helper."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedders.errors import UserError
from index.embeddings_io import read_embeddings, resolve_embedding_files, write_embeddings
from tests.test_index_helpers import clustered, ids_for, provenance, write_output_dir


def test_output_dir_roundtrip_two_shards_with_run_report(tmp_path):
    x = clustered(50, 8)
    out = write_output_dir(tmp_path / "OUT", x, shards=2)
    emb = read_embeddings(out)
    assert emb.ids == ids_for(50)
    assert emb.vectors.dtype == np.float32 and emb.vectors.shape == (50, 8)
    np.testing.assert_allclose(emb.vectors, x, atol=1e-6)
    assert len(emb.files) == 2 and emb.run_report_path.endswith("run_report.json")
    assert emb.provenance["model_id"] == "test/tiny-seeded" and emb.provenance["random_init"] is True
    cols = emb.metadata.column_names
    assert cols[0] == "product_id" and "title" in cols and "price" in cols
    assert not {"vector", "image_vector", "text_vector", "review_vector"} & set(cols)
    assert emb.metadata.column("product_id").to_pylist() == emb.ids
    h = emb.source_hash()
    assert len(h) == 64 and h == read_embeddings(out).source_hash()


def test_directory_glob_and_single_file_inputs(tmp_path):
    x = clustered(30, 4)
    out = write_output_dir(tmp_path / "OUT", x, shards=3)
    by_dir = read_embeddings(out / "embeddings")          # a directory named embeddings: report from parent
    assert by_dir.ids == ids_for(30) and by_dir.run_report_path is not None
    by_glob = read_embeddings(str(out / "embeddings" / "part-*.parquet"))
    assert by_glob.ids == ids_for(30)
    single = read_embeddings(out / "embeddings" / "part-00001.parquet")
    assert single.n == 10 and single.run_report_path is None
    files, report = resolve_embedding_files(out)
    assert [f.name for f in files] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]


def test_provenance_filled_from_run_report_when_schema_lacks_it(tmp_path):
    x = clustered(10, 4)
    write_embeddings(tmp_path / "OUT" / "embeddings" / "part-0.parquet", ids_for(10), x)  # no schema metadata
    (tmp_path / "OUT" / "run_report.json").write_text(json.dumps({"model_id": "m/x", "random_init": False}))
    emb = read_embeddings(tmp_path / "OUT")
    assert emb.provenance == {"model_id": "m/x", "random_init": False}


def test_unnormalised_vectors_are_renormalised_and_counted(tmp_path):
    x = clustered(20, 4) * 3.0
    write_embeddings(tmp_path / "e.parquet", ids_for(20), x)
    emb = read_embeddings(tmp_path / "e.parquet")
    assert emb.renormalised == 20
    np.testing.assert_allclose(np.linalg.norm(emb.vectors, axis=1), 1.0, atol=1e-5)


def test_extra_vector_columns_and_binary_are_not_metadata(tmp_path):
    x = clustered(6, 4)
    rows = [None if i % 2 else x[i] for i in range(6)]
    write_embeddings(tmp_path / "e.parquet", ids_for(6), x, {"image": [b"\xff\xd8"] * 6, "title": list("abcdef")},
                     extra_vectors={"image_vector": rows, "text_vector": x})
    schema = pq.read_schema(tmp_path / "e.parquet")
    assert schema.field("vector").type == pa.list_(pa.float32(), 4)
    assert schema.field("image_vector").type == pa.list_(pa.float32(), 4)
    assert pq.ParquetFile(tmp_path / "e.parquet").metadata.row_group(0).column(2).statistics.null_count == 3
    emb = read_embeddings(tmp_path / "e.parquet")
    assert emb.metadata.column_names == ["product_id", "title"]


# ------------------------------------------------------------------------------------------------------- errors
def test_no_files_and_empty_embeddings(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no embeddings Parquet files"):
        read_embeddings(tmp_path / "empty")
    with pytest.raises(UserError, match="no such file"):
        read_embeddings(tmp_path / "missing")
    write_embeddings(tmp_path / "zero" / "part-0.parquet", [], np.zeros((0, 4), np.float32))
    with pytest.raises(UserError, match="empty"):
        read_embeddings(tmp_path / "zero")


def test_mismatched_dims_across_shards_names_both_files(tmp_path):
    write_embeddings(tmp_path / "e" / "part-0.parquet", ["a", "b"], clustered(2, 4))
    write_embeddings(tmp_path / "e" / "part-1.parquet", ["c"], clustered(1, 8))
    with pytest.raises(UserError) as ei:
        read_embeddings(tmp_path / "e")
    msg = str(ei.value)
    assert "part-1.parquet" in msg and "part-0.parquet" in msg and "'vector'" in msg and "dim 8" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("bad,word", [(np.nan, "NaN"), (np.inf, "inf")])
def test_nan_or_inf_vector_names_file_field_and_product(tmp_path, bad, word):
    x = clustered(5, 4)
    x[3, 1] = bad
    write_embeddings(tmp_path / "e" / "part-7.parquet", ids_for(5), x)
    with pytest.raises(UserError) as ei:
        read_embeddings(tmp_path / "e")
    msg = str(ei.value)
    assert word in msg and "part-7.parquet" in msg and "'vector'" in msg and "'P00003'" in msg


def test_duplicate_ids_across_shards(tmp_path):
    write_embeddings(tmp_path / "e" / "part-0.parquet", ["a", "b"], clustered(2, 4))
    write_embeddings(tmp_path / "e" / "part-1.parquet", ["c", "a"], clustered(2, 4, seed=1))
    with pytest.raises(UserError) as ei:
        read_embeddings(tmp_path / "e")
    msg = str(ei.value)
    assert "duplicate product_id 'a'" in msg and "part-0.parquet" in msg and "part-1.parquet" in msg


def test_null_and_zero_vectors_and_missing_columns(tmp_path):
    vec = pa.array([[1.0, 0.0], None], type=pa.list_(pa.float32(), 2))
    pq.write_table(pa.table({"product_id": ["a", "b"], "vector": vec}), tmp_path / "null.parquet")
    with pytest.raises(UserError, match="null.parquet: field 'vector' has 1 null value"):
        read_embeddings(tmp_path / "null.parquet")
    write_embeddings(tmp_path / "zero.parquet", ["a", "b"], np.array([[1, 0], [0, 0]], np.float32))
    with pytest.raises(UserError, match="all-zero vector for product_id 'b'"):
        read_embeddings(tmp_path / "zero.parquet")
    pq.write_table(pa.table({"product_id": ["a"]}), tmp_path / "novec.parquet")
    with pytest.raises(UserError, match="missing column 'vector'"):
        read_embeddings(tmp_path / "novec.parquet")
    pq.write_table(pa.table({"id": ["a"], "vector": pa.array([[1.0]], pa.list_(pa.float32(), 1))}),
                   tmp_path / "noid.parquet")
    with pytest.raises(UserError, match="missing column 'product_id'"):
        read_embeddings(tmp_path / "noid.parquet")
    pq.write_table(pa.table({"product_id": ["a"], "vector": ["x"]}), tmp_path / "str.parquet")
    with pytest.raises(UserError, match="field 'vector' has type string"):
        read_embeddings(tmp_path / "str.parquet")


def test_variable_length_lists_are_accepted_when_uniform(tmp_path):
    vec = pa.array([[1.0, 0.0], [0.0, 1.0]], type=pa.list_(pa.float64()))
    pq.write_table(pa.table({"product_id": ["a", "b"], "vector": vec}), tmp_path / "v.parquet")
    emb = read_embeddings(tmp_path / "v.parquet")
    assert emb.vectors.dtype == np.float32 and emb.vectors.shape == (2, 2)
    vec = pa.array([[1.0, 0.0], [1.0]], type=pa.list_(pa.float32()))
    pq.write_table(pa.table({"product_id": ["a", "b"], "vector": vec}), tmp_path / "w.parquet")
    with pytest.raises(UserError, match="length 1 for product_id 'b'"):
        read_embeddings(tmp_path / "w.parquet")


def test_mixed_models_across_shards_refused(tmp_path):
    write_embeddings(tmp_path / "e" / "part-0.parquet", ["a"], clustered(1, 4), provenance=provenance(4))
    write_embeddings(tmp_path / "e" / "part-1.parquet", ["b"], clustered(1, 4),
                     provenance={**provenance(4), "model_id": "other/model"})
    with pytest.raises(UserError, match="model_id"):
        read_embeddings(tmp_path / "e")


def test_provenance_dim_must_match_vectors(tmp_path):
    write_embeddings(tmp_path / "e.parquet", ["a"], clustered(1, 4), provenance={**provenance(4), "dim": 512})
    with pytest.raises(UserError, match="provenance dim 512"):
        read_embeddings(tmp_path / "e.parquet")
