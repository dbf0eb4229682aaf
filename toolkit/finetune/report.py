"""Base vs fine-tuned on the held-out set: answer-token loss and perplexity, a generation score,
side-by-side samples, general-text perplexity (forgetting), and the loss curves plot.

The base is the same model with the LoRA adapter disabled, so both sides share the exact
(quantized) base weights and only the adapter differs.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

from toolkit.core import packed_linear
from toolkit.core.progress import quiet
from toolkit.finetune import run_folder, scoring

# Written for this project (not finance): general prose to show whether fine-tuning on finance
# Q&A made the model worse at ordinary text.
GENERAL_TEXT = """\
The river starts as a thin stream high in the mountains, fed by snow that melts each spring. As it runs \
downhill it gathers water from small creeks, cuts through forests of pine and birch, and slows down when \
it reaches the wide valley below. Farmers in the valley have used its water for centuries, digging \
channels to carry it to their fields of wheat and barley.

In the old town by the bridge, the market opens early on Saturday mornings. Bakers bring fresh bread, \
cheese makers set out wheels of aged cheese, and children run between the stalls looking for sweets. \
By noon most of the vegetables are gone, and the square fills with people sitting in the sun, talking \
about the weather and the news of the week.

A good soup needs patience more than skill. Onions are cooked slowly in butter until they are soft and \
golden, then carrots, celery and a few potatoes are added with enough water to cover them. After an hour \
on a low flame the flavours come together, and a little salt and pepper is all it needs before serving.

The library was quiet except for the sound of pages turning. On the top floor, a student was reading \
about the history of the printing press, which made books cheaper and helped ideas spread across Europe. \
Before it, every copy of a book had to be written by hand, and a single volume could take months to finish.
"""

_NUM = re.compile(r"[$,]")


def _norm(s: str) -> str:
    return _NUM.sub("", s.lower())


def _alternatives(key) -> list[str]:
    """A key is a string or a list of interchangeable strings (any one of them counts)."""
    return [str(k) for k in key] if isinstance(key, (list, tuple)) else [str(key)]


def _has(a: str, key) -> bool:
    return any(_norm(k) in a for k in _alternatives(key))


def key_score(answer: str, keys: list) -> float:
    """Fraction of `keys` (numbers or terms; a list entry = any of its alternatives) present in
    `answer`, ignoring case, `$` and thousands commas."""
    if not keys:
        return float("nan")
    a = _norm(answer)
    return sum(1 for k in keys if _has(a, k)) / len(keys)


def is_correct(answer: str, keys: list, wrong: list | None = None) -> bool:
    """An answer is right when every required key is present and no contradiction marker is
    (e.g. "prices rise" for "bond prices fall when rates rise"), so saying both directions, or
    the right term inside a wrong claim, does not count."""
    if not keys:
        return False
    a = _norm(answer)
    return all(_has(a, k) for k in keys) and not any(_has(a, w) for w in (wrong or []))


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% for z=1.96); (0, 1) when n == 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _side(model, tok, split, rec, dtype, questions, packed, answers: list[str] | None = None) -> dict:
    """One side's measurements; `answers` when its greedy answers were generated already (paired).
    `packed(use)`: the block that runs `model`'s frozen layers as this CPU measured faster for `use`
    (the loss and perplexity passes' many-row forwards: "score"; decoding: "infer")."""
    seconds = {}
    with packed("score"):
        t0 = time.perf_counter()
        loss, n = scoring.answer_loss(model, split.input_ids, split.labels, dtype)
        seconds["answer_loss"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        general_ppl = round(scoring.text_perplexity(model, tok, GENERAL_TEXT, dtype), 3)
        seconds["general_ppl"] = round(time.perf_counter() - t0, 2)
    if answers is None:
        t0 = time.perf_counter()
        with packed("infer"):
            answers = scoring.greedy_answers(model, tok, [q["prompt"] for q in questions], rec.eval.max_new_tokens,
                                             dtype) if questions else []
        seconds["answers"] = round(time.perf_counter() - t0, 2)
    correct = [is_correct(a, q["keys"], q["wrong"]) for a, q in zip(answers, questions)]
    shares = [key_score(a, q["keys"]) for a, q in zip(answers, questions)]
    k, m = sum(correct), len(correct)
    lo, hi = wilson_interval(k, m)
    return {
        "answer_loss": round(loss, 4), "answer_ppl": round(math.exp(loss), 3), "answer_tokens": n,
        # Share of questions answered right (every key present, no contradiction marker), with its
        # binomial standard error and 95% Wilson interval: on a few dozen questions a difference of
        # one or two answers is noise, and the report has to say so.
        "generation_score": round(k / m, 4) if m else None, "generation_correct": k,
        "generation_se": round(math.sqrt((k / m) * (1 - k / m) / m), 4) if m else None,
        "generation_ci95": [round(lo, 4), round(hi, 4)] if m else None,
        "key_share": round(sum(shares) / m, 4) if m else None,
        "general_ppl": general_ppl,
        # Where the report's time goes (a GPU waits on the host per batch and per decoding step).
        "seconds": seconds,
        "_answers": answers, "_correct": correct,
    }


def _meta(ex) -> dict:
    return ex.extra.get("meta") if isinstance(ex.extra.get("meta"), dict) else {}


def _keys_for(ex) -> list:
    meta = _meta(ex)
    if meta.get("keys"):
        return [list(map(str, k)) if isinstance(k, (list, tuple)) else str(k) for k in meta["keys"]]
    # No declared keys: the numbers in the reference answer are what must come back.
    ref = next((m["content"] for m in reversed(ex.messages) if m["role"] == "assistant"), "")
    return re.findall(r"\d[\d,]*\.?\d*%?", ref)[:3]


def _questions(split, limit: int) -> list[dict]:
    """`limit` held-out conversations that have keys to judge the answer by, taken in turn from each
    kind (concept, calculation, ...) in file order, so a few calculations at the top of the file
    can't crowd out the concept questions where regressions show."""
    out = []
    for ex in split.examples:
        if not ex.messages or not any(m["role"] == "assistant" for m in ex.messages):
            continue
        keys = _keys_for(ex)
        if not keys:
            continue
        last = max(j for j, m in enumerate(ex.messages) if m["role"] == "assistant")
        meta = _meta(ex)
        out.append({"prompt": ex.messages[:last], "question": ex.messages[last - 1]["content"] if last else "",
                    "reference": ex.messages[last]["content"], "keys": keys,
                    # shape checked when the data was read (data.check_report_meta); null = none
                    "wrong": [w for w in meta.get("wrong") or [] if w],
                    "kind": meta.get("kind") or meta.get("topic") or ""})
    by_kind: dict[str, list[dict]] = {}
    for q in out:
        by_kind.setdefault(q["kind"], []).append(q)
    queues = list(by_kind.values())
    picked = []
    while len(picked) < min(limit, len(out)):
        for queue in queues:
            if queue and len(picked) < limit:
                picked.append(queue.pop(0))
    return picked


def _base_as_loaded(model, tok, choice, dev: str):
    """The base model for a full fine-tune's report: training changed its own weights, so there is
    no adapter to switch off; it is loaded again from where the run loaded it, in the trained
    model's dtype, with the same special-token ids."""
    from toolkit.core.chat_tokens import sync_special_ids
    from toolkit.core.errors import UserError
    from toolkit.core.loading import load_causal_lm

    if choice is None:
        raise UserError("the report of a full fine-tune needs the base model it started from")
    base = load_causal_lm(choice.source, str(next(model.parameters()).dtype).removeprefix("torch."), dev)
    sync_special_ids(base, tok)
    return base.eval()


def evaluate(model, tok, split, rec, dtype: str = "auto", choice=None, base_model=None, say=quiet) -> dict:
    """Compare base and fine-tuned. `model` is a PeftModel (base = adapter disabled), or pass `base_model`;
    after a full fine-tune the base is loaded again from `choice.source`.
    `dtype` "auto" is the device's evaluation choice (toolkit.core.hardware.dtype_for(dev, "eval")).
    `say` gets a line as each pass ends (the answers, each side's measurements): on a 2-core CPU the
    report takes about a minute, on a GPU with a 1B model longer, and it should not pass in silence."""
    if dtype == "auto":
        from toolkit.core import hardware

        dtype = hardware.dtype_for(str(next(model.parameters()).device), "eval")
    questions = _questions(split, rec.eval.generation_samples)
    prompts = [q["prompt"] for q in questions]
    dev = str(next(model.parameters()).device)
    if base_model is None and not hasattr(model, "disable_adapter"):
        base_model = _base_as_loaded(model, tok, choice, dev)
    # Each block packs the weights it runs with (after the merge for the fine-tuned side): frozen for
    # its length, as packed_linear requires.
    def packed(m):
        return lambda use: packed_linear.for_device(m, dev, dtype, use)[0]

    pair = None
    t_start = time.perf_counter()
    if base_model is None and prompts:
        with packed(model)("infer"):
            pair = scoring.paired_greedy_answers(model, tok, prompts, rec.eval.max_new_tokens, dtype)
    paired_s = round(time.perf_counter() - t_start, 2)
    if pair:
        say(f"report: {len(prompts)} greedy answers, base and fine-tuned in one batch ({paired_s:.1f} s)")
    if base_model is not None:
        base = _side(base_model, tok, split, rec, dtype, questions, packed(base_model))
    else:
        with model.disable_adapter():
            base = _side(model, tok, split, rec, dtype, questions, packed(model), pair and pair[0])
    say(_side_line("base", base, len(questions)))
    with scoring.merged_adapter(model):
        tuned = _side(model, tok, split, rec, dtype, questions, packed(model), pair and pair[1])
    say(_side_line("fine-tuned", tuned, len(questions)))
    per_question = []
    for j, q in enumerate(questions):
        per_question.append({"question": q["question"], "kind": q["kind"], "reference": q["reference"],
                             "keys": q["keys"], "wrong": q["wrong"],
                             "base_correct": base["_correct"][j], "finetuned_correct": tuned["_correct"][j],
                             "base": base["_answers"][j], "finetuned": tuned["_answers"][j]})
    samples = [{k: p[k] for k in ("question", "reference", "keys", "base", "finetuned")}
               for p in per_question[: rec.eval.side_by_side]]
    for side in (base, tuned):
        side.pop("_answers"), side.pop("_correct")
    improvement = {
        "answer_loss_reduction": round(1 - tuned["answer_loss"] / base["answer_loss"], 4),
        "general_ppl_change": round(tuned["general_ppl"] / base["general_ppl"] - 1, 4),
        "generation_fixed": sum(1 for p in per_question if p["finetuned_correct"] and not p["base_correct"]),
        "generation_regressed": sum(1 for p in per_question if p["base_correct"] and not p["finetuned_correct"]),
    }
    return {"base": base, "finetuned": tuned, "improvement": improvement,
            "regressions": [p for p in per_question if p["base_correct"] and not p["finetuned_correct"]],
            "per_question": per_question, "samples": samples,
            "heldout_examples": len(split.input_ids), "generation_questions": len(questions),
            # The paired answers (both sides in one generation, where that applies) and the whole.
            "seconds": {"paired_answers": paired_s if pair else None,
                        "total": round(time.perf_counter() - t_start, 2)},
            "base_model": getattr(choice, "spec", None)}


def _side_line(name: str, side: dict, questions: int) -> str:
    """One progress line for a side's measurements and the time they took."""
    right = f", {side['generation_correct']} of {questions} answers right" if questions else ""
    return (f"report: {name}: answer-token loss {side['answer_loss']:.4f}, general-text perplexity "
            f"{side['general_ppl']:.2f}{right} ({sum(side['seconds'].values()):.1f} s)")


def summary(rep: dict) -> str:
    """The report in one line, as `toolkit finetune` prints it when the run ends: the held-out
    answer-token loss and the general-text perplexity, base -> fine-tuned, and the questions answered
    right with the fixes and regressions among them (report.md has the rest)."""
    b, t, imp = rep["base"], rep["finetuned"], rep["improvement"]
    line = (f"held-out answer-token loss {b['answer_loss']:.4f} -> {t['answer_loss']:.4f} "
            f"({-imp['answer_loss_reduction'] * 100:+.1f}%); general-text perplexity {b['general_ppl']:.2f} -> "
            f"{t['general_ppl']:.2f} ({imp['general_ppl_change'] * 100:+.1f}%)")
    n = rep["generation_questions"]
    if n:
        line += (f"; answers right {b['generation_correct']} -> {t['generation_correct']} of {n} "
                 f"({imp['generation_fixed']} fixed, {imp['generation_regressed']} regressed)")
    return line


def _keys_text(keys: list) -> str:
    return ", ".join(" or ".join(k) if isinstance(k, list) else k for k in keys)


def _cell(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _score(side: dict) -> str:
    if side.get("generation_score") is None:
        return "-"
    lo, hi = side["generation_ci95"]
    return f"{side['generation_score']:.3f} ± {side['generation_se']:.3f} (95% CI {lo:.2f}-{hi:.2f})"


def write(run_dir: Path, rep: dict, info: dict) -> None:
    """report.json and report.md in `run_dir`, regressions (base right, fine-tuned wrong) first."""
    run_dir = Path(run_dir)
    b, t, imp = rep["base"], rep["finetuned"], rep["improvement"]
    n = rep["generation_questions"]
    regs = rep.get("regressions", [])

    def row(name, key, fmt="{}"):
        bv, tv = b.get(key), t.get(key)
        return f"| {name} | {fmt.format(bv) if bv is not None else '-'} | {fmt.format(tv) if tv is not None else '-'} |"

    lines = [f"# Fine-tune report: {info.get('recipe')}", ""]
    if n:
        lines += [f"**Regressions: {len(regs)}** of {n} held-out questions (base right, fine-tuned wrong); "
                  f"fixed: {imp.get('generation_fixed', 0)} (base wrong, fine-tuned right); right: base "
                  f"{b.get('generation_correct')}/{n}, fine-tuned {t.get('generation_correct')}/{n}.", ""]
        for r in regs:
            lines += [f"- REGRESSION: {_cell(r['question'])}", f"  - base: {_cell(r['base'], 300)}",
                      f"  - fine-tuned: {_cell(r['finetuned'], 300)}",
                      f"  - needs: {_keys_text(r['keys'])}" + (f"; must not say: {_keys_text(r['wrong'])}"
                                                                 if r.get("wrong") else "")]
        if regs:
            lines.append("")
    lines += [
        f"Base model: `{info.get('base_model')}`" + (f" (fallback: {info['fallback_reason']})"
                                                     if info.get("fallback_reason") else ""),
        f"Method: {info.get('method')} · {info.get('engine')} · {info.get('device')} {info.get('compute_dtype')} · "
        f"{info.get('steps')} steps · {info.get('tokens_per_s')} tokens/s", "",
        f"Held-out set: {rep['heldout_examples']} conversations, {b.get('answer_tokens')} answer tokens. Answer-token "
        "loss: mean NLL over those tokens all together (token-weighted, as the training loss); perplexity: exp of "
        f"that mean, over a fixed English text for the general-text one. Generation score: share of {n} greedy "
        "answers that are right (every key number/term present and no contradiction such as the opposite "
        "direction), ± its binomial standard error, with the 95% Wilson interval.", "",
        "| metric | base | fine-tuned |", "|---|---|---|",
        row("answer-token loss", "answer_loss", "{:.4f}"), row("answer-token perplexity", "answer_ppl", "{:.3f}"),
        f"| generation score | {_score(b)} | {_score(t)} |",
        row("key terms present (share)", "key_share", "{:.3f}"),
        row("general-text perplexity (forgetting)", "general_ppl", "{:.3f}"), "",
        f"Answer-token loss reduction: **{imp['answer_loss_reduction'] * 100:.1f}%**; general-text perplexity "
        f"change: {imp['general_ppl_change'] * 100:+.1f}%.", "",
    ]
    if rep.get("per_question"):
        lines += ["## Per question", "", "| # | kind | question | base | fine-tuned |", "|---|---|---|---|---|"]
        for i, p in enumerate(rep["per_question"], 1):
            mark = " **regression**" if p["base_correct"] and not p["finetuned_correct"] else ""
            lines.append(f"| {i} | {p['kind']} | {_cell(p['question'], 110)} | "
                         f"{'right' if p['base_correct'] else 'wrong'} | "
                         f"{'right' if p['finetuned_correct'] else 'wrong'}{mark} |")
        lines.append("")
    lines += ["## Samples", ""]
    for s in rep["samples"]:
        lines += [f"**Q:** {s['question']}", "", f"- reference: {s['reference']}", f"- base: {s['base']}",
                  f"- fine-tuned: {s['finetuned']}", f"- keys: {_keys_text(s['keys'])}", ""]
    run_folder.write_json(run_dir / "report.json", rep)
    run_folder.write_text(run_dir / "report.md", "\n".join(lines))


def plot_losses(metrics_path: Path, out_png: Path, report: dict | None = None, last_step: int | None = None) -> None:
    """loss.png: train loss and in-training eval loss against optimizer step, from metrics.jsonl, and
    the report's answer loss of the base (step 0) and fine-tuned model (last step) when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    if Path(metrics_path).is_file():
        rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if ev:
        ax.plot(*zip(*ev), marker="o", label="eval loss (held-out, eval_examples)")
    if report and last_step:
        ax.plot([0, last_step], [report["base"]["answer_loss"], report["finetuned"]["answer_loss"]], "s--",
                label="report: base -> fine-tuned (all held-out)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (answer tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
