"""index.filters: one grammar (CLI / query-string and JSON forms), evaluation over metadata, errors naming fields."""
from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest

from embedders.errors import UserError
from index.filters import Condition, FilterError, evaluate, parse_condition, parse_filters, validate


@pytest.fixture()
def table():
    return pa.table({
        "product_id": ["a", "b", "c", "d", "e", "f"],
        "category": ["Shoes", "Bags", "Shoes", "Home, Kitchen", None, "Watches"],
        "price": [100.0, 2500.0, 1999.99, 2000.0, 50.0, None],
        "stock": pa.array([0, 5, 10, 3, 7, 1], pa.int64()),
        "in_stock": [False, True, True, True, True, None],
        "launched": pa.array([dt.date(2024, 1, d) for d in (1, 5, 10, 15, 20, 25)], pa.date32()),
        "cat_dict": pa.array(["x", "y", "x", "y", "x", "y"]).dictionary_encode(),
    })


def ids(table, mask):
    return [p for p, m in zip(table.column("product_id").to_pylist(), mask) if m]


@pytest.mark.parametrize("text,cond", [
    ("category=Shoes", Condition("category", "in", ("Shoes",))),
    ("category = Shoes ", Condition("category", "in", ("Shoes",))),
    ("category=Shoes,Bags", Condition("category", "in", ("Shoes", "Bags"))),
    (r"category=Home\, Kitchen,Bags", Condition("category", "in", ("Home, Kitchen", "Bags"))),
    ('category="Home, Kitchen",Bags', Condition("category", "in", ("Home, Kitchen", "Bags"))),
    ("price<2000", Condition("price", "lt", "2000")),
    ("price<=2000", Condition("price", "le", "2000")),
    ("price>2000", Condition("price", "gt", "2000")),
    ("price>=2000", Condition("price", "ge", "2000")),
    ("title=a=b", Condition("title", "in", ("a=b",))),
])
def test_parse_string_forms(text, cond):
    assert parse_condition(text) == cond


@pytest.mark.parametrize("text,field", [("price<", "price"), ("category=", "category"), ("category=a,,b", "category"),
                                         ('category="a', "category")])
def test_parse_errors_name_the_field(text, field):
    with pytest.raises(FilterError, match=f"'{field}'"):
        parse_condition(text)


@pytest.mark.parametrize("text", ["=x", "price", "<3", "9lives=1"])
def test_parse_errors_without_field(text):
    with pytest.raises(FilterError, match="expected field=value"):
        parse_condition(text)


def test_filter_error_is_a_user_error():
    assert issubclass(FilterError, UserError) and issubclass(FilterError, ValueError)


def test_json_form_and_string_form_are_the_same_grammar(table):
    js = {"category": ["Shoes", "Bags"], "price": {"ge": 100, "lt": 2500}}
    strings = ["category=Shoes,Bags", "price>=100", "price<2500"]
    m1, m2 = evaluate(js, table), evaluate(strings, table)
    assert ids(table, m1) == ids(table, m2) == ["a", "c"]
    assert evaluate('{"category": "Shoes"}', table).tolist() == evaluate("category=Shoes", table).tolist()
    flt = parse_filters(js)
    assert parse_filters(flt.to_json()) == flt
    assert parse_filters(str(parse_filters("category=Shoes,Bags"))) == parse_filters("category=Shoes,Bags")


def test_evaluate_all_operators(table):
    assert ids(table, evaluate("category=Shoes", table)) == ["a", "c"]
    assert ids(table, evaluate("category=Shoes,Watches", table)) == ["a", "c", "f"]
    assert ids(table, evaluate(r"category=Home\, Kitchen", table)) == ["d"]
    assert ids(table, evaluate("price<2000", table)) == ["a", "c", "e"]        # null price never matches
    assert ids(table, evaluate("price<=2000", table)) == ["a", "c", "d", "e"]
    assert ids(table, evaluate("price>2000", table)) == ["b"]
    assert ids(table, evaluate("price>=2000", table)) == ["b", "d"]
    assert ids(table, evaluate("price=100,2000", table)) == ["a", "d"]
    assert ids(table, evaluate("stock>=5", table)) == ["b", "c", "e"]          # int column, numeric value
    assert ids(table, evaluate({"stock": 0}, table)) == ["a"]
    assert ids(table, evaluate("in_stock=false", table)) == ["a"]
    assert ids(table, evaluate({"in_stock": True}, table)) == ["b", "c", "d", "e"]
    assert ids(table, evaluate("launched>=2024-01-15", table)) == ["d", "e", "f"]
    assert ids(table, evaluate({"launched": {"lt": "2024-01-05"}}, table)) == ["a"]
    assert ids(table, evaluate("cat_dict=y", table)) == ["b", "d", "f"]
    assert ids(table, evaluate(["category=Shoes", "price>150"], table)) == ["c"]   # AND
    assert evaluate(None, table).all() and evaluate([], table).all()


def test_evaluation_errors_name_the_field(table):
    with pytest.raises(FilterError, match="unknown filter field 'colour'; available: product_id, category"):
        evaluate("colour=red", table)
    with pytest.raises(FilterError, match="'category'.*numeric or date"):
        evaluate("category<3", table)
    with pytest.raises(FilterError, match="'price'.*'cheap' is not a number"):
        evaluate("price<cheap", table)
    with pytest.raises(FilterError, match="'in_stock'.*not a boolean"):
        evaluate("in_stock=maybe", table)
    with pytest.raises(FilterError, match="'launched'.*ISO"):
        evaluate("launched>yesterday", table)
    with pytest.raises(FilterError, match="'price': unknown operator 'lte'"):
        evaluate({"price": {"lte": 3}}, table)
    with pytest.raises(FilterError, match="'category': empty value list"):
        evaluate({"category": []}, table)
    with pytest.raises(FilterError, match="invalid JSON"):
        parse_filters('{"price": ')
    with pytest.raises(FilterError, match="'price'.*NaN"):
        evaluate({"price": float("nan")}, table)


def test_validate_checks_without_scanning(table):
    assert validate("price<3", table.schema)
    with pytest.raises(FilterError, match="'nope'"):
        validate(["price<3", "nope=1"], table)


def test_mask_is_numpy_bool(table):
    m = evaluate("category=Shoes", table)
    assert isinstance(m, np.ndarray) and m.dtype == bool and m.shape == (6,)
