"""The finance data set: size, coverage, no held-out leakage, and numbers that recompute."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest

DIR = Path(__file__).resolve().parents[2] / "recipes" / "finance"


def load(name):
    return [json.loads(line) for line in (DIR / name).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def train():
    return load("train.jsonl")


@pytest.fixture(scope="module")
def held():
    return load("heldout.jsonl")


def question(r):
    return next(m["content"] for m in r["messages"] if m["role"] == "user")


def answer(r):
    return next(m["content"] for m in r["messages"] if m["role"] == "assistant")


def skeleton(text):
    """A sentence with its numbers blanked: the 'same template with other numbers' test."""
    return re.sub(r"\d[\d,]*(\.\d+)?", "#", text.lower()).strip()


def sentences(text):
    return [s for s in re.split(r"(?<=[.?!])\s+", text) if s]


def test_counts_and_topics(train, held):
    assert len(train) >= 400 and len(held) >= 80
    topics = {"interest", "inflation", "bonds", "equities", "diversification", "budgeting", "loans", "taxes"}
    assert topics <= {r["meta"]["topic"] for r in train}
    assert topics <= {r["meta"]["topic"] for r in held}
    # Worked calculations dominate and every conversation is system + user + assistant.
    assert all([m["role"] for m in r["messages"]] == ["system", "user", "assistant"] for r in train + held)


def test_split_is_by_template_and_nothing_leaks(train, held):
    assert not {r["meta"]["template"] for r in train} & {r["meta"]["template"] for r in held}
    train_q = {skeleton(question(r)) for r in train}
    train_sent = {skeleton(s) for r in train for s in sentences(question(r))}
    for r in held:
        assert skeleton(question(r)) not in train_q, question(r)
        for s in sentences(question(r)):
            assert skeleton(s) not in train_sent, s


def test_generator_reproduces_committed_files(train, held):
    spec = importlib.util.spec_from_file_location("make_data", DIR / "make_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    t, h = mod.generate(7)
    assert t == train and h == held


def money_values(text):
    return [float(x.replace(",", "")) for x in re.findall(r"\$([\d,]+\.\d\d)", text)]


def pcts(text):
    return [float(x) / 100 for x in re.findall(r"(\d+(?:\.\d+)?)%", text)]


def ints_before(text, word):
    return int(re.search(r"(\d+)[ -]" + word, text).group(1))


# Independent re-derivations (written from the textbook formulas, not imported from the generator).
def check_ci_annual(q, keys):
    p, = money_values(q)[:1]
    r = pcts(q)[0]
    t = ints_before(q, "years")
    return p * math.pow(1 + r, t)


def check_ci_monthly(q, keys):
    p = money_values(q)[0]
    r = pcts(q)[0]
    t = ints_before(q, "years")
    return p * math.exp(12 * t * math.log1p(r / 12))


def check_payment(q, keys):
    p = money_values(q)[0]
    r = pcts(q)[0] / 12
    n = ints_before(q, "years") * 12
    # Annuity: the payment that makes the present value of n payments equal the principal.
    pv_factor = sum((1 + r) ** -k for k in range(1, n + 1))
    return p / pv_factor


def check_zero_coupon(q, keys):
    face = money_values(q)[0]
    return face / (1 + pcts(q)[0]) ** ints_before(q, "years")


def check_bond(q, keys):
    face = money_values(q)[0]
    c, y = pcts(q)[:2]
    n = ints_before(q, "year")
    cash = [face * c] * n
    cash[-1] += face
    return sum(cf / (1 + y) ** (k + 1) for k, cf in enumerate(cash))


def check_pe(q, keys):
    price, eps = money_values(q)[:2]
    return price / eps


def check_npv(q, keys):
    vals = money_values(q)
    r = pcts(q)[-1]
    return -vals[0] + sum(cf / (1 + r) ** (k + 1) for k, cf in enumerate(vals[1:]))


def check_cagr(q, keys):
    a, b = money_values(q)[:2]
    return (b / a) ** (1 / ints_before(q, "years")) - 1


CHECKS = {"ci_annual": check_ci_annual, "ci_monthly": check_ci_monthly, "loan_payment": check_payment,
          "mortgage_payment": check_payment, "zero_coupon": check_zero_coupon, "bond_price": check_bond,
          "pe_ratio": check_pe, "npv": check_npv, "cagr": check_cagr}


def test_numbers_recompute(train, held):
    checked = 0
    for r in train + held:
        check = CHECKS.get(r["meta"]["template"])
        if not check:
            continue
        expected = check(question(r), r["meta"]["keys"])
        key = r["meta"]["keys"][0]
        got = float(key.rstrip("%").replace(",", "")) / (100 if key.endswith("%") else 1)
        tol = 0.006 if not key.endswith("%") and "." in key else 5e-5
        if r["meta"]["template"] == "pe_ratio":
            tol = 0.051
        assert abs(got - expected) <= tol, (question(r), key, expected)
        # The key number really is in the answer the model is trained on.
        assert key in answer(r)
        checked += 1
    assert checked >= 150
