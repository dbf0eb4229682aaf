"""The run report's generation part: per-question correctness (keys present, no contradiction),
the sampling error of the score, regressions at the top of report.md and in report.json."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest


def _wilson_by_search(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Reference: the Wilson interval is the set of p whose score test accepts k/n; find its ends
    by scanning p (no closed form)."""
    phat = k / n
    inside = [i / 100000 for i in range(100001)
              if abs(phat - i / 100000) <= z * math.sqrt((i / 100000) * (1 - i / 100000) / n)]
    return min(inside), max(inside)


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (7, 40), (20, 40), (1, 3)])
def test_wilson_interval_matches_the_score_test(k, n):
    from toolkit.finetune.report import wilson_interval

    lo, hi = wilson_interval(k, n)
    rlo, rhi = _wilson_by_search(k, n)
    assert lo == pytest.approx(rlo, abs=2e-5) and hi == pytest.approx(rhi, abs=2e-5)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_correct_needs_every_key_and_no_contradiction():
    from toolkit.finetune.report import is_correct, key_score

    fall = [["fall", "drop", "opposite"]]
    wrong = ["bond prices rise", "prices go up"]
    assert is_correct("When rates rise, bond prices fall.", fall, wrong)
    assert not is_correct("When rates rise, bond prices rise, then fall later.", fall, wrong)
    assert not is_correct("Rates and bond prices are related.", fall, wrong)
    assert is_correct("The answer is $5,301.49 in total.", ["5,301.49"])
    assert is_correct("About 5301.49.", ["5,301.49"])  # `$` and thousands commas ignored
    assert not is_correct("5,301.49 and nothing else", ["5,301.49", "4,800.00"])
    assert key_score("5,301.49 and nothing else", ["5,301.49", "4,800.00"]) == 0.5
    assert not is_correct("anything", [])


def test_finance_heldout_rules_judge_real_answers():
    """The finance held-out set's own rules on answers the embedded base and the first finance run
    gave (compare tab, greedy): the fine-tuned one claimed the wrong direction."""
    from pathlib import Path

    from toolkit.finetune.report import is_correct

    rows = [json.loads(line) for line in
            (Path(__file__).resolve().parents[2] / "recipes/finance/heldout.jsonl").read_text().splitlines()]
    for r in rows:  # every reference answer passes its own rule
        assert is_correct(r["messages"][-1]["content"], r["meta"]["keys"], r["meta"].get("wrong")), r
    meta = next(r["meta"] for r in rows if r["meta"]["template"] == "c_bond_yield_h")
    base = "When interest rates rise, the value of a bond decreases. This is because interest is a fixed payment."
    tuned = "When interest rates go up, the price of a bond increases."
    assert is_correct(base, meta["keys"], meta["wrong"])
    assert not is_correct(tuned, meta["keys"], meta["wrong"])
    assert not is_correct(tuned + " Later the price may fall.", meta["keys"], meta["wrong"])


def test_evaluate_lists_every_question_and_write_puts_regressions_first(tiny, chat_prompts, tmp_path):
    import copy

    from peft import LoraConfig, get_peft_model

    from toolkit.finetune import report
    from toolkit.finetune.data import Example

    model, tok = tiny
    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    examples = [Example(messages=p + [{"role": "assistant", "content": "A bond is a loan."}], text=None,
                        source=f"h:{i}", extra={"meta": {"keys": [["loan", "debt"]], "wrong": ["stock"],
                                                         "kind": "concept"}})
                for i, p in enumerate(chat_prompts)]
    ids = [tok(tok.apply_chat_template(e.messages, tokenize=False))["input_ids"][:40] for e in examples]
    split = SimpleNamespace(examples=examples, input_ids=ids, labels=ids)
    rec = SimpleNamespace(eval=SimpleNamespace(generation_samples=4, max_new_tokens=5, side_by_side=2))
    rep = report.evaluate(peft, tok, split, rec, "float32")
    assert rep["generation_questions"] == 4 and len(rep["per_question"]) == 4 and len(rep["samples"]) == 2
    for p in rep["per_question"]:
        assert p["base_correct"] == report.is_correct(p["base"], p["keys"], p["wrong"])
        assert p["finetuned_correct"] == report.is_correct(p["finetuned"], p["keys"], p["wrong"])
    for side in ("base", "finetuned"):
        s = rep[side]
        lo, hi = s["generation_ci95"]
        assert lo <= s["generation_score"] <= hi and s["generation_correct"] == round(4 * s["generation_score"])
    # Where the time went: each side's loss pass and perplexity, the answers run once for both sides
    # (paired, on a CPU) or on each side, and the whole, which holds every part.
    paired = rep["seconds"]["paired_answers"]
    parts = [v for side in ("base", "finetuned") for v in rep[side]["seconds"].values()] + [paired or 0]
    assert all(v >= 0 for v in parts) and sum(parts) <= rep["seconds"]["total"] + 0.05
    assert (paired is None) == ("answers" in rep["base"]["seconds"]) == ("answers" in rep["finetuned"]["seconds"])

    # write(): a report with one regression and one fix, as evaluate() shapes it.
    def q(i, b, f):
        return {"question": f"Q{i}?", "kind": "concept", "reference": "r", "keys": [["fall", "drop"]],
                "wrong": ["prices rise"], "base_correct": b, "finetuned_correct": f,
                "base": f"base says {i}", "finetuned": f"tuned says {i}"}

    per = [q(1, True, False), q(2, False, True), q(3, True, True)]
    rep.update(per_question=per, regressions=[per[0]], samples=[], generation_questions=3)
    rep["improvement"].update(generation_fixed=1, generation_regressed=1)
    report.write(tmp_path, rep, {"recipe": "finance"})
    md = (tmp_path / "report.md").read_text().splitlines()
    assert md[2].startswith("**Regressions: 1** of 3 held-out questions")
    assert md[4] == "- REGRESSION: Q1?" and "tuned says 1" in md[6] and "must not say: prices rise" in md[7]
    assert "| 1 | concept | Q1? | right | wrong **regression** |" in md
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["regressions"][0]["question"] == "Q1?" and saved["improvement"]["generation_regressed"] == 1
    assert not list(tmp_path.glob("*.tmp"))


def test_questions_take_each_kind_in_turn():
    """Calculations at the top of the held-out file can't crowd out the concept questions."""
    from toolkit.finetune.data import Example, TokenizedSplit
    from toolkit.finetune.report import _questions

    def ex(i, kind):
        msgs = [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"answer {i}"}]
        return Example(msgs, None, f"f:{i}", {"meta": {"kind": kind, "keys": [f"answer {i}"]}})

    kinds = ["calculation"] * 6 + ["concept"] * 3 + ["concept-unseen"]
    split = TokenizedSplit([[]] * len(kinds), [[]] * len(kinds), [ex(i, k) for i, k in enumerate(kinds)])
    qs = _questions(split, 5)
    assert [q["question"] for q in qs] == ["q0", "q6", "q9", "q1", "q7"]
    assert len(_questions(split, 50)) == len(kinds)
