"""Base vs fine-tuned on the held-out set: answer-token loss and perplexity, a generation score,
side-by-side samples, general-text perplexity (forgetting), and the loss curves plot.

The base is the same model with the LoRA adapter disabled, so both sides share the exact
(quantized) base weights and only the adapter differs.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path

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


def key_score(answer: str, keys: list[str]) -> float:
    """Fraction of `keys` (numbers or terms) present in `answer`, ignoring case, `$` and thousands commas."""
    if not keys:
        return float("nan")
    a = _norm(answer)
    return sum(1 for k in keys if _norm(str(k)) in a) / len(keys)


def _autocast(model, dtype: str):
    import torch

    dev = next(model.parameters()).device.type
    if dtype in ("bfloat16", "float16"):
        return torch.autocast(device_type=dev, dtype=getattr(torch, dtype))
    return contextlib.nullcontext()


def answer_loss(model, input_ids: list[list[int]], labels: list[list[int]], dtype: str = "float32",
                batch_size: int = 8) -> tuple[float, int]:
    """(mean NLL per trained token, number of trained tokens) over examples, by right-padded batches."""
    import torch
    import torch.nn.functional as F

    dev = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad(), _autocast(model, dtype):
        for i in range(0, len(input_ids), batch_size):
            ids, labs = input_ids[i:i + batch_size], labels[i:i + batch_size]
            n = max(len(x) for x in ids)
            x = torch.tensor([a + [0] * (n - len(a)) for a in ids], device=dev)
            y = torch.tensor([b + [-100] * (n - len(b)) for b in labs], device=dev)
            att = torch.tensor([[1] * len(a) + [0] * (n - len(a)) for a in ids], device=dev)
            logits = model(input_ids=x, attention_mask=att).logits.float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), y[:, 1:].reshape(-1),
                                   ignore_index=-100, reduction="sum")
            total += loss.item()
            count += int((y[:, 1:] != -100).sum())
    return total / max(count, 1), count


def text_perplexity(model, tok, text: str, dtype: str = "float32", max_len: int = 1024) -> float:
    ids = tok(text, add_special_tokens=False)["input_ids"][:max_len]
    nll, _ = answer_loss(model, [ids], [ids], dtype, batch_size=1)
    return math.exp(nll)


def greedy_answers(model, tok, prompts: list[list[dict]], max_new_tokens: int, dtype: str = "float32",
                   batch_size: int = 16) -> list[str]:
    """Greedy replies to chat prompts (left-padded batches; stops at EOS)."""
    import torch

    dev = next(model.parameters()).device
    old_side = tok.padding_side
    tok.padding_side = "left"
    outs = []
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                     for m in prompts[i:i + batch_size]]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
            with torch.no_grad(), _autocast(model, dtype):
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            for row in gen[:, enc["input_ids"].shape[1]:]:
                outs.append(tok.decode(row, skip_special_tokens=True).strip())
    finally:
        tok.padding_side = old_side
    return outs


def _side(model, tok, split, rec, dtype, prompts, keys) -> dict:
    loss, n = answer_loss(model, split.input_ids, split.labels, dtype)
    answers = greedy_answers(model, tok, prompts, rec.eval.max_new_tokens, dtype) if prompts else []
    scores = [key_score(a, k) for a, k in zip(answers, keys) if k]
    return {
        "answer_loss": round(loss, 4), "answer_ppl": round(math.exp(loss), 3), "answer_tokens": n,
        "generation_score": round(sum(scores) / len(scores), 4) if scores else None,
        "general_ppl": round(text_perplexity(model, tok, GENERAL_TEXT, dtype), 3),
        "_answers": answers,
    }


def _keys_for(ex) -> list[str]:
    meta = ex.extra.get("meta") if isinstance(ex.extra.get("meta"), dict) else {}
    if meta.get("keys"):
        return [str(k) for k in meta["keys"]]
    # No declared keys: the numbers in the reference answer are what must come back.
    ref = next((m["content"] for m in reversed(ex.messages) if m["role"] == "assistant"), "")
    return re.findall(r"\d[\d,]*\.?\d*%?", ref)[:3]


def evaluate(model, tok, split, rec, dtype: str, choice=None, base_model=None) -> dict:
    """Compare base and fine-tuned. `model` is a PeftModel (base = adapter disabled), or pass `base_model`."""
    chats = [i for i, ex in enumerate(split.examples) if ex.messages][: rec.eval.generation_samples]
    prompts, keys, refs = [], [], []
    for i in chats:
        msgs = split.examples[i].messages
        last = max(j for j, m in enumerate(msgs) if m["role"] == "assistant")
        prompts.append(msgs[:last])
        refs.append(msgs[last]["content"])
        keys.append(_keys_for(split.examples[i]))
    tuned = _side(model, tok, split, rec, dtype, prompts, keys)
    if base_model is not None:
        base = _side(base_model, tok, split, rec, dtype, prompts, keys)
    else:
        with model.disable_adapter():
            base = _side(model, tok, split, rec, dtype, prompts, keys)
    samples = []
    for j in range(min(rec.eval.side_by_side, len(prompts))):
        samples.append({"question": prompts[j][-1]["content"], "reference": refs[j], "keys": keys[j],
                        "base": base["_answers"][j], "finetuned": tuned["_answers"][j]})
    base.pop("_answers"), tuned.pop("_answers")
    improvement = {
        "answer_loss_reduction": round(1 - tuned["answer_loss"] / base["answer_loss"], 4),
        "general_ppl_change": round(tuned["general_ppl"] / base["general_ppl"] - 1, 4),
    }
    return {"base": base, "finetuned": tuned, "improvement": improvement, "samples": samples,
            "heldout_examples": len(split.input_ids), "generation_questions": len(prompts),
            "base_model": getattr(choice, "spec", None)}


def write(run_dir: Path, rep: dict, info: dict) -> None:
    """report.json and report.md in `run_dir`."""
    run_dir = Path(run_dir)
    (run_dir / "report.json").write_text(json.dumps(rep, indent=2) + "\n")
    b, t, imp = rep["base"], rep["finetuned"], rep["improvement"]

    def row(name, key, fmt="{}"):
        bv, tv = b.get(key), t.get(key)
        return f"| {name} | {fmt.format(bv) if bv is not None else '-'} | {fmt.format(tv) if tv is not None else '-'} |"

    lines = [
        f"# Fine-tune report: {info.get('recipe')}", "",
        f"Base model: `{info.get('base_model')}`" + (f" (fallback: {info['fallback_reason']})"
                                                     if info.get("fallback_reason") else ""),
        f"Method: {info.get('method')} · {info.get('engine')} · {info.get('device')} {info.get('compute_dtype')} · "
        f"{info.get('steps')} steps · {info.get('tokens_per_s')} tokens/s", "",
        f"Held-out set: {rep['heldout_examples']} conversations; generation score on "
        f"{rep['generation_questions']} greedy answers (share of key numbers/terms present).", "",
        "| metric | base | fine-tuned |", "|---|---|---|",
        row("answer-token loss", "answer_loss", "{:.4f}"), row("answer-token perplexity", "answer_ppl", "{:.3f}"),
        row("generation score", "generation_score", "{:.3f}"),
        row("general-text perplexity (forgetting)", "general_ppl", "{:.3f}"), "",
        f"Answer-token loss reduction: **{imp['answer_loss_reduction'] * 100:.1f}%**; general-text perplexity "
        f"change: {imp['general_ppl_change'] * 100:+.1f}%.", "", "## Samples", "",
    ]
    for s in rep["samples"]:
        lines += [f"**Q:** {s['question']}", "", f"- reference: {s['reference']}", f"- base: {s['base']}",
                  f"- fine-tuned: {s['finetuned']}", f"- keys: {', '.join(s['keys'])}", ""]
    (run_dir / "report.md").write_text("\n".join(lines))


def plot_losses(metrics_path: Path, out_png: Path) -> None:
    """loss.png: train loss and eval loss against optimizer step, from metrics.jsonl."""
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
        ax.plot(*zip(*ev), marker="o", label="eval loss (held-out)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (answer tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
