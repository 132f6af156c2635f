"""Retrieval metrics (index/evaluate.py) on tiny hand-made cases with values computed by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from index import evaluate as ev


def unit(deg: float) -> list[float]:
    r = math.radians(deg)
    return [math.cos(r), math.sin(r)]


# Five products on the unit circle; similarity falls with the angle between them.
ANGLES = [0, 10, 30, 55, 90]           # a b c d e
LABELS = ["X", "Y", "X", "Y", "X"]
V = np.asarray([unit(a) for a in ANGLES], dtype=np.float32)
CODES = ev.encode_labels(LABELS)[0]

# Worked by hand (item-to-item, the query excluded):
#   a: b c d e -> rel 0 1 0 1     b: a c d e -> 0 0 1 0     c: b d a e -> 0 0 1 1
#   d: c e b a -> 0 0 1 0         e: d c b a -> 0 1 0 1
# precision@2 = (1/2 + 0 + 0 + 0 + 1/2) / 5 = 0.2
# ndcg@2: a and e have DCG = 1/log2(3), IDCG = 1 + 1/log2(3) (R = 2); b, c, d have DCG 0 -> mean = 2*0.386853/5
# AP: a (1/2 + 2/4)/2 = 0.5; b (1/3); c (1/3 + 2/4)/2 = 5/12; d (1/3); e 0.5 -> mAP = 25/12/5 = 5/12
NDCG_AE = (1 / math.log2(3)) / (1 + 1 / math.log2(3))


def test_item_to_item_hand_values():
    res = ev.item_to_item(V, CODES, np.ones(5, bool), k=2)
    assert res.neighbours.tolist() == [[1, 2], [0, 2], [1, 3], [2, 4], [3, 2]]
    assert res.precision.tolist() == [0.5, 0.0, 0.0, 0.0, 0.5]
    assert res.precision.mean() == pytest.approx(0.2)
    assert res.ndcg.tolist() == pytest.approx([NDCG_AE, 0, 0, 0, NDCG_AE])
    assert res.ndcg.mean() == pytest.approx(2 * NDCG_AE / 5)
    assert res.ap.tolist() == pytest.approx([0.5, 1 / 3, 5 / 12, 1 / 3, 0.5])
    assert res.ap.mean() == pytest.approx(5 / 12)
    s = res.summary(2)
    assert s == {"precision@2": 0.2, "ndcg@2": pytest.approx(round(2 * NDCG_AE / 5, 6)), "map": round(5 / 12, 6)}


def test_precision_at_1_and_coverage():
    res = ev.item_to_item(V, CODES, np.ones(5, bool), k=1)
    assert res.neighbours[:, 0].tolist() == [1, 0, 1, 2, 3]
    assert res.precision.mean() == 0.0
    # top-1 lists {b, a, b, c, d}: 4 of 5 products are ever recommended
    assert ev.coverage(res.neighbours, 5, 1) == pytest.approx(0.8)


def test_missing_vectors_and_labels_are_excluded():
    v = V.copy()
    v[1] = 0.0  # b has no vector: neither a query nor a neighbour
    codes = CODES.copy()
    codes[4] = -1  # e has no label: a neighbour (never relevant) but not a query
    res = ev.item_to_item(v, codes, np.ones(5, bool), k=2)
    assert res.query_rows.tolist() == [0, 2, 3]
    # a: c d e -> rel 1 0 0 ; c: a d e -> d(25) a(30) e(60) -> 0 1 ; d: c e a -> c(25) e(35) -> 0 0
    assert res.neighbours.tolist() == [[2, 3], [3, 0], [2, 4]]
    assert res.precision.tolist() == [0.5, 0.5, 0.0]
    # a: R = 1 (c), DCG = 1 -> 1.0 ; c: R = 1 (a), DCG = 1/log2(3) ; d: R = 0 -> 0
    assert res.ndcg.tolist() == pytest.approx([1.0, 1 / math.log2(3), 0.0])


def test_query_subset_searches_whole_catalog():
    mask = np.array([True, False, False, False, True])
    res = ev.item_to_item(V, CODES, mask, k=2)
    assert res.query_rows.tolist() == [0, 4]
    assert res.neighbours.tolist() == [[1, 2], [3, 2]]
    assert res.precision.mean() == pytest.approx(0.5)


# Cross-modal: text queries at these angles against the images above (nothing excluded).
#   t_a 2:  a b | t_b 40: c d | t_c 28: c b | t_d 88: e d | t_e 91: e d
# recall@2 (own image in top 2): a yes, b no, c yes, d yes, e yes -> 0.8; precision@2: every list has one of the
# query's label -> 0.5. recall@1: a, c, e -> 0.6; precision@1: a(X) yes, c for b(Y) no, c(X) yes, e for d(Y) no,
# e(X) yes -> 0.6.
T = np.asarray([unit(a) for a in (2, 40, 28, 88, 91)], dtype=np.float32)


def test_cross_modal_hand_values():
    res = ev.cross_modal(T, V, CODES, np.ones(5, bool), k=2)
    assert res.neighbours.tolist() == [[0, 1], [2, 3], [2, 1], [4, 3], [4, 3]]
    assert res.recall.tolist() == [1, 0, 1, 1, 1]
    assert res.precision.mean() == pytest.approx(0.5)
    res1 = ev.cross_modal(T, V, CODES, np.ones(5, bool), k=1)
    assert res1.recall.mean() == pytest.approx(0.6)
    assert res1.precision.mean() == pytest.approx(0.6)


def test_cross_modal_needs_both_modalities():
    img = V.copy()
    img[1] = 0
    txt = T.copy()
    txt[3] = 0
    res = ev.cross_modal(txt, img, CODES, np.ones(5, bool), k=2)
    assert res.query_rows.tolist() == [0, 2, 4]      # b has no image to find, d no text to ask with
    assert 1 not in res.neighbours                   # b's missing image is never returned


def test_ties_break_by_position_and_short_corpus_pads():
    v = np.asarray([[1, 0], [1, 0], [1, 0]], np.float32)
    idx, sc = ev.topk_neighbours(v[:1], v, k=4, exclude=np.array([0]))
    assert idx.tolist() == [[1, 2, -1, -1]]
    assert sc[0, 2] == -np.inf


def test_average_precision_and_ndcg_primitives():
    rel = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]], bool)
    assert ev.average_precision(rel).tolist() == pytest.approx([(1 + 2 / 3) / 2, 0.0, 0.5])
    # ndcg@3 for row 0 with R = 2: (1 + 1/log2(4)) / (1 + 1/log2(3))
    assert ev.ndcg_at_k(rel, np.array([2, 0, 1]), 3).tolist() == pytest.approx(
        [(1 + 0.5) / (1 + 1 / math.log2(3)), 0.0, (1 / math.log2(3)) / 1.0])


def test_overlap_recall_for_ann():
    approx = np.array([[1, 2], [0, 3], [-1, -1]])
    exact = np.array([[1, 3], [3, 0], [2, 4]])
    assert ev.overlap_recall(approx, exact, 2).tolist() == [0.5, 1.0, 0.0]


def test_labels_encoding_and_chance():
    codes, names = ev.encode_labels(["b", None, "a", float("nan"), " ", "b"])
    assert names == ["a", "b"]
    assert codes.tolist() == [1, -1, 0, -1, -1, 1]
    # queries X,Y,X,Y,X: same-label share among the 4 others = X: 2/4, Y: 1/4 -> (3*0.5 + 2*0.25)/5 = 0.4
    assert ev.chance_precision(CODES, np.ones(5, bool)) == pytest.approx(0.4)


def test_evaluate_vectors_json_shape_and_per_label():
    vs = ev.VectorSet([f"p{i}" for i in range(5)], CODES, ["X", "Y"],
                      {"image": V, "text": T, "fused": V}, meta={"model_id": "m"})
    m = ev.evaluate_vectors(vs, k=2).metrics
    assert set(m) >= {"item_to_item", "text_to_image", "coverage@2", "per_label", "ann"}
    assert m["item_to_item"]["fused"]["precision@2"] == 0.2
    assert m["item_to_item"]["reviews"] is None
    assert m["text_to_image"]["recall@2"] == 0.8 and m["text_to_image"]["precision@2"] == 0.5
    # per label, fused precision@2: X = (0.5 + 0 + 0.5)/3, Y = 0
    assert m["per_label"]["X"]["precision@2"]["fused"] == pytest.approx(round(1 / 3, 6))
    assert m["per_label"]["Y"]["precision@2"]["fused"] == 0.0
    assert m["worst_labels"][0]["label"] == "Y"
    assert m["coverage@2"] == 1.0  # lists a:{b,c} b:{a,c} c:{b,d} d:{c,e} e:{d,c}


def test_unaligned_text_to_image_is_skipped():
    vs = ev.VectorSet(["a", "b"], np.array([0, 0]), ["X"], {"image": np.eye(2, 3, dtype=np.float32),
                                                             "text": np.eye(2, dtype=np.float32),
                                                             "fused": np.eye(2, dtype=np.float32)})
    m = ev.evaluate_vectors(vs, k=1).metrics
    assert m["text_to_image"]["recall@1"] is None and "different spaces" in m["text_to_image"]["skipped"]


def test_ann_figures_against_exact():
    vs = ev.VectorSet([f"p{i}" for i in range(5)], CODES, ["X", "Y"], {"fused": V})

    def ann(rows, k):  # a deliberately bad "index": always returns e then d (never the query itself)
        return np.array([[4, 3] if r not in (3, 4) else [2, 1] for r in rows])

    m = ev.evaluate_vectors(vs, k=2, ann=ann).metrics
    # exact lists a:{1,2} b:{0,2} c:{1,3} d:{2,4} e:{3,2}; ann a:{4,3} b:{4,3} c:{4,3} d:{2,1} e:{2,1}
    # overlap: 0, 0, 1/2, 1/2, 1/2 -> 0.3 ; ann label precision: a X:{e X,d Y}=.5 b Y:{e,d}=.5 c X:.5 d Y:{c X,b Y}=.5
    # e X:{c X,b Y}=.5 -> 0.5 ; exact 0.2 -> lost -0.3
    assert m["ann"]["recall@2"] == pytest.approx(0.3)
    assert m["ann"]["precision@2"] == pytest.approx(0.5)
    assert m["ann"]["precision_lost@2"] == pytest.approx(-0.3)


def test_fuse_rows_matches_fuse_row_by_row():
    from embedders.fusion import FusionConfig, fuse

    rng = np.random.default_rng(0)
    img = rng.normal(size=(6, 4)).astype(np.float32)
    txt = rng.normal(size=(6, 3)).astype(np.float32)
    rev = rng.normal(size=(6, 3)).astype(np.float32)
    img[1] = 0
    txt[2] = 0
    rev[[0, 3]] = 0
    img[4] = txt[4] = rev[4] = 0  # nothing usable
    for cfg in ({"mode": "concat", "weights": {"image": 0.3, "text": 0.7, "reviews": 0.5}},
                {"mode": "concat", "weights": {"image": 1.0, "text": 0.0, "reviews": 1.0}}):
        got = ev.fuse_rows({"image": img, "text": txt, "reviews": rev}, cfg)
        fc = FusionConfig.from_dict(cfg)
        for i in range(6):
            want = fuse({"image": img[i] if img[i].any() else None, "text": txt[i] if txt[i].any() else None,
                         "reviews": rev[i] if rev[i].any() else None}, fc, {"image": 4, "text": 3, "reviews": 3})
            if want is None:
                assert not got[i].any()
            else:
                np.testing.assert_allclose(got[i], want, atol=1e-6)
    sq = rng.normal(size=(5, 3)).astype(np.float32)
    sq[2] = 0
    cfg = {"mode": "sum", "weights": {"image": 2.0, "text": 1.0, "reviews": 0.5}}
    got = ev.fuse_rows({"image": sq, "text": txt[:5]}, cfg)
    for i in range(5):
        want = fuse({"image": sq[i] if sq[i].any() else None, "text": txt[i] if txt[i].any() else None},
                    FusionConfig.from_dict(cfg), {"image": 3, "text": 3, "reviews": 3})
        if want is None:  # row 2: neither modality present
            assert i == 2 and not got[i].any()
        else:
            np.testing.assert_allclose(got[i], want, atol=1e-6)


def test_weight_grid_and_tune_fusion_prefers_the_informative_modality():
    assert ev.weight_grid(2, 0.25) == [(0.0, 1.0), (0.25, 0.75), (0.5, 0.5), (0.75, 0.25), (1.0, 0.0)]
    assert len(ev.weight_grid(3, 0.1)) == 66
    rng = np.random.default_rng(1)
    n = 80
    labels = np.repeat(np.arange(4), n // 4)
    centers = rng.normal(size=(4, 8))
    good = centers[labels] + 0.3 * rng.normal(size=(n, 8))   # text: clusters by label
    noise = rng.normal(size=(n, 6))                          # image: no label signal
    vs = ev.VectorSet([f"p{i}" for i in range(n)], labels, ["a", "b", "c", "d"],
                      {"image": noise.astype(np.float32), "text": good.astype(np.float32)},
                      meta={"fusion": {"mode": "concat", "weights": {"image": 1.0, "text": 1.0, "reviews": 0.5}}})
    ids = vs.ids
    res = ev.tune_fusion(vs, ids[::2], ids[1::2], k=5, step=0.25)
    assert res["modes"] == ["concat"]  # different dims: no 'sum'
    assert res["chosen"]["weights"]["image"] <= 0.25 and res["chosen"]["weights"]["text"] >= 0.75
    assert res["chosen"]["weights"]["reviews"] == 0.5  # absent modality keeps the configured weight
    assert res["test"]["precision@5"] >= res["test"]["equal_weights_precision@5"]
    snippet = ev.fusion_snippet(res)
    import tomllib

    assert tomllib.loads(snippet)["fusion"]["mode"] == "concat"
