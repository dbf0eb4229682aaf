"""The run report: per-question correctness (keys present, no contradiction), the sampling error of
the score, regressions at the top of report.md and in report.json, and its losses, perplexities and
percentages against an independent computation."""

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


def test_each_pass_of_the_report_packs_for_its_own_use(tiny, chat_prompts, monkeypatch):
    # Decoding steps of a few rows and loss passes of hundreds pack differently well (the Zen 3: 1.28x
    # against 0.88x): the loss and perplexity passes run under "score", the answers under "infer".
    import contextlib
    import copy

    from peft import LoraConfig, get_peft_model

    from toolkit.core import packed_linear
    from toolkit.finetune import report, scoring
    from toolkit.finetune.data import Example

    model, tok = tiny
    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    active, seen = [], []

    @contextlib.contextmanager
    def block(use):
        active.append(use)
        yield 0
        active.pop()

    def spy(name, real):  # which packing blocks are open when each pass runs
        def call(*a, **k):
            seen.append((name, tuple(active)))
            return real(*a, **k)
        return call

    monkeypatch.setattr(packed_linear, "for_device", lambda m, dev, dtype, use, skip=(): (block(use), "why"))
    for name in ("answer_loss", "text_perplexity", "paired_greedy_answers", "greedy_answers"):
        monkeypatch.setattr(scoring, name, spy(name, getattr(scoring, name)))
    examples = [Example(messages=p + [{"role": "assistant", "content": "A loan."}], text=None, source=f"h:{i}",
                        extra={"meta": {"keys": [["loan"]], "wrong": [], "kind": "concept"}})
                for i, p in enumerate(chat_prompts)]
    ids = [tok(tok.apply_chat_template(e.messages, tokenize=False))["input_ids"][:40] for e in examples]
    split = SimpleNamespace(examples=examples, input_ids=ids, labels=ids)
    rec = SimpleNamespace(eval=SimpleNamespace(generation_samples=2, max_new_tokens=3, side_by_side=1))
    report.evaluate(peft, tok, split, rec, "float32")
    report.evaluate(peft, tok, split, rec, "float32", base_model=copy.deepcopy(model))  # each side answers apart
    assert set(seen) == {("paired_greedy_answers", ("infer",)), ("answer_loss", ("score",)),
                         ("text_perplexity", ("score",)), ("greedy_answers", ("infer",))}


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
    lines = []
    rep = report.evaluate(peft, tok, split, rec, "float32", say=lines.append)
    assert rep["generation_questions"] == 4 and len(rep["per_question"]) == 4 and len(rep["samples"]) == 2
    # A line as each pass ends: the paired answers (a CPU), then each side with its own numbers.
    b, t = rep["base"], rep["finetuned"]
    assert lines == [
        f"report: 4 greedy answers, base and fine-tuned in one batch ({rep['seconds']['paired_answers']:.1f} s)",
        f"report: base: answer-token loss {b['answer_loss']:.4f}, general-text perplexity {b['general_ppl']:.2f}, "
        f"{b['generation_correct']} of 4 answers right ({sum(b['seconds'].values()):.1f} s)",
        f"report: fine-tuned: answer-token loss {t['answer_loss']:.4f}, general-text perplexity "
        f"{t['general_ppl']:.2f}, {t['generation_correct']} of 4 answers right ({sum(t['seconds'].values()):.1f} s)"]
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


def test_summary_is_the_report_in_one_line():
    from toolkit.finetune import report

    def side(loss, ppl, right):
        return {"answer_loss": loss, "general_ppl": ppl, "generation_correct": right}

    rep = {"base": side(2.1503, 23.073, 6), "finetuned": side(1.6102, 22.256, 5), "generation_questions": 16,
           "improvement": {"answer_loss_reduction": 0.2512, "general_ppl_change": -0.0354, "generation_fixed": 1,
                           "generation_regressed": 2}}
    assert report.summary(rep) == ("held-out answer-token loss 2.1503 -> 1.6102 (-25.1%); general-text perplexity "
                                   "23.07 -> 22.26 (-3.5%); answers right 6 -> 5 of 16 (1 fixed, 2 regressed)")
    rep.update(generation_questions=0)  # no held-out question had keys to judge an answer by
    rep["improvement"]["general_ppl_change"] = 0.012
    assert report.summary(rep) == ("held-out answer-token loss 2.1503 -> 1.6102 (-25.1%); general-text perplexity "
                                   "23.07 -> 22.26 (+1.2%)")


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


def test_evaluate_numbers_match_an_independent_computation(tiny, chat_prompts, tmp_path):
    """Both sides' numbers against transformers' own loss with the toolkit's assistant-token labels: the
    answer loss is the mean over all answer tokens together (as the training loss), not the mean of the
    conversations' means; the general-text perplexity is HF's over the text as its tokenizer encodes it;
    the reduction and change, and report.md's percentages, follow from those numbers."""
    import copy
    import re

    import torch
    from peft import LoraConfig, get_peft_model

    from toolkit.finetune import data, report

    model, tok = tiny
    torch.manual_seed(0)
    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    replies = ["A loan.", "Money you earn also earns money, year after year, so savings grow faster and faster.",
               "Hello!", "Annual percentage rate: the yearly cost of the credit.", "Prices rise."]
    examples = [data.Example(p + [{"role": "assistant", "content": a}], None, f"h:{i}", {"meta": {"keys": ["loan"]}})
                for i, (p, a) in enumerate(zip(chat_prompts, replies))]
    # The two longest conversations are cut inside their answers: the kept starts are scored, as in training.
    split = data.tokenize_split(tok, examples, 52)
    assert split.n_truncated == 2 and len(split.input_ids) == 5
    rec = SimpleNamespace(eval=SimpleNamespace(generation_samples=2, max_new_tokens=3, side_by_side=1))
    rep = report.evaluate(peft, tok, split, rec, "float32")

    def independent():
        total, count, means = 0.0, 0, []
        with torch.no_grad():
            for x, y in zip(split.input_ids, split.labels):
                mean = peft(input_ids=torch.tensor([x]), labels=torch.tensor([y])).loss.item()
                n = sum(t != -100 for t in y[1:])
                total, count = total + mean * n, count + n
                means.append(mean)
            text = torch.tensor([tok(report.GENERAL_TEXT)["input_ids"]])
            ppl = math.exp(peft(input_ids=text, labels=text).loss.item())
        return total / count, count, sum(means) / len(means), ppl

    with peft.disable_adapter():
        base = independent()
    tuned = independent()
    assert abs(tuned[2] - tuned[0]) > 1e-3  # the two means differ here, so the loss check tells them apart
    for side, (loss, n, per_conversation, ppl) in (("base", base), ("finetuned", tuned)):
        got = rep[side]
        assert got["answer_tokens"] == n and got["answer_loss"] == pytest.approx(loss, abs=1e-4)
        assert got["answer_ppl"] == pytest.approx(math.exp(loss), rel=1e-4)
        assert got["general_ppl"] == pytest.approx(ppl, rel=1e-5)
    imp = rep["improvement"]
    assert imp["answer_loss_reduction"] == pytest.approx(1 - tuned[0] / base[0], abs=2e-4)
    assert imp["general_ppl_change"] == pytest.approx(tuned[3] / base[3] - 1, abs=2e-4)
    report.write(tmp_path, rep, {"recipe": "t"})
    md = (tmp_path / "report.md").read_text()
    assert f"Held-out set: 5 conversations, {base[1]} answer tokens." in md and "token-weighted" in md
    reduction, change = re.search(r"loss reduction: \*\*(-?[\d.]+)%\*\*; general-text perplexity change: ([+-][\d.]+)%",
                                  md).groups()
    assert float(reduction) == pytest.approx(100 * (1 - tuned[0] / base[0]), abs=0.06)
    assert float(change) == pytest.approx(100 * (tuned[3] / base[3] - 1), abs=0.06)


def test_a_full_fine_tunes_report_loads_its_base_again(tiny, tiny_llama_dir, chat_prompts):
    """After a full fine-tune there is no adapter to switch off: the base side is the model loaded
    again from the run's source, and reads as the untouched model does."""
    import copy

    import torch

    from toolkit.core.errors import UserError
    from toolkit.finetune import data, report

    model, tok = tiny
    full = copy.deepcopy(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in full.parameters():
            p.add_(0.02 * torch.randn_like(p))
    examples = [data.Example(p + [{"role": "assistant", "content": "A loan."}], None, f"h:{i}", {"meta": {"keys": ["loan"]}})
                for i, p in enumerate(chat_prompts)]
    split = data.tokenize_split(tok, examples, 64)
    rec = SimpleNamespace(eval=SimpleNamespace(generation_samples=2, max_new_tokens=3, side_by_side=1))
    rep = report.evaluate(full, tok, split, rec, "float32", SimpleNamespace(source=str(tiny_llama_dir)))
    ref = report.evaluate(full, tok, split, rec, "float32", base_model=model)
    for side in ("base", "finetuned"):
        for key in ("answer_loss", "general_ppl", "answer_tokens"):
            assert rep[side][key] == ref[side][key], (side, key)
    assert rep["base"]["answer_loss"] != rep["finetuned"]["answer_loss"]
    with pytest.raises(UserError, match="full fine-tune needs the base model"):
        report.evaluate(full, tok, split, rec, "float32")


def test_a_report_error_is_recorded_whatever_the_locale(tmp_path):
    """The traceback of a failed report may hold the user's text (here a key of their data): written
    in the locale's encoding (Windows: cp1252) it raised in the handler that keeps the trained run."""
    from tests.ascii_locale import run_python

    proc = run_python(
        "import sys, types\nfrom pathlib import Path\nfrom toolkit.finetune import report, trainer\n"
        "def boom(*a, **k):\n    raise KeyError('donn\\u00e9es \\u2014 cl\\u00e9 absente')\n"
        "report.evaluate = boom\nrec = types.SimpleNamespace(eval=types.SimpleNamespace(report=True))\n"
        "info = {}\n"
        "model = types.SimpleNamespace(model=None)\n"
        "split = types.SimpleNamespace(input_ids=[])\n"
        "error = trainer._evaluate_and_report(model, None, split, rec, 'float32', None, Path(sys.argv[1]), info,"
        " lambda msg: None)\n"
        "print(ascii(error), ascii(info['report_error']))", str(tmp_path))
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert "donn\\xe9es" in proc.stdout.decode()
    assert "KeyError: 'données — clé absente'" in (tmp_path / "report_error.txt").read_text(encoding="utf-8")
