"""The text an export is verified on: the run's held-out data when it records some (found
through the run's resolved recipe.yaml), else a fixed finance chat plus prose. Either is about
500 tokens: with ~250, the q8_0 perplexity check swung by two points between LoRA inits."""

from __future__ import annotations

from pathlib import Path

# Used when a run has no held-out data (or the export is not of a run): a chat-formatted
# finance exchange plus plain prose, so both the template tokens and ordinary text are scored.
FIXED_MESSAGES = [
    {"role": "user", "content": "What is compound interest, and how much is $1,000 worth after 3 years at 5% a year?"},
    {"role": "assistant", "content": (
        "Compound interest is interest earned on both the original amount and on the interest already added. "
        "After 3 years at 5% compounded yearly, $1,000 grows to 1000 x 1.05^3 = $1,157.63."
    )},
    {"role": "user", "content": "Why do bond prices fall when interest rates rise?"},
    {"role": "assistant", "content": (
        "A bond pays fixed coupons. When new bonds offer higher rates, the old bond's fixed payments are worth "
        "less, so its price drops until its yield matches the market."
    )},
    {"role": "user", "content": "What is a price-to-earnings ratio? A share costs $50 and earnings are $2.50 per share."},
    {"role": "assistant", "content": (
        "The price-to-earnings (P/E) ratio is the share price divided by the earnings per share. Here it is "
        "50 / 2.50 = 20, so investors pay $20 for every dollar of annual earnings. A high P/E can mean the "
        "market expects growth, or that the stock is expensive compared with its profits."
    )},
    {"role": "user", "content": "How does a fixed-rate mortgage payment stay the same every month?"},
    {"role": "assistant", "content": (
        "The payment is set so that the loan is repaid exactly over its term. Early payments are mostly "
        "interest, because the balance is large; as the balance falls, more of each payment goes to the "
        "principal. This schedule is called amortization."
    )},
]
FIXED_PROSE = (
    "Inflation is the rate at which the general level of prices for goods and services rises, and with it the "
    "purchasing power of money falls. Central banks try to keep inflation low and stable, usually by raising or "
    "lowering short-term interest rates. Diversification means spreading investments across assets whose "
    "returns do not move together, so that a loss in one is partly offset by gains in others. A budget lists "
    "expected income and spending for a month or a year, so that saving for goals such as an emergency fund "
    "or retirement happens before the money is spent. Taxes on investment income depend on the country, the "
    "kind of account, and how long the investment was held."
)


def fixed_text(tokenizer) -> str:
    """The built-in verification text: a chat in the model's own template, then prose."""
    return tokenizer.apply_chat_template(FIXED_MESSAGES, tokenize=False) + FIXED_PROSE


def heldout_text(run_dir, tokenizer, max_tokens: int = 500) -> tuple[str, str] | None:
    """(text, source) from a run's held-out data, about `max_tokens` long, or None when the run
    records none (no recipe.yaml, no `data.eval`) or it cannot be read.

    The run's resolved recipe.yaml and its `data.eval` file are read with the fine-tune readers,
    so the examples are exactly what training evaluated on, rendered in the chat template.
    A relative path is tried against run.json's `recipe_dir`, then the run folder, then the cwd.
    """
    from toolkit.core.errors import UserError
    from toolkit.core.models import run_info
    from toolkit.finetune import recipe as recipe_mod
    from toolkit.finetune.data import read_examples, render

    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file():
        return None
    try:
        # Already resolved at training time: any cpu profile was applied before it was written.
        rec = recipe_mod.load(run_dir / "recipe.yaml", gpu=True)
    except UserError:
        return None  # a hand-edited or older recipe: verify on the fixed text instead
    if not rec.data.eval:
        return None
    try:
        recipe_dir = run_info(run_dir).get("recipe_dir")
    except UserError:
        recipe_dir = None
    candidates = []
    for root in ([Path(recipe_dir)] if isinstance(recipe_dir, str) else []) + [run_dir, Path.cwd()]:
        rec.root = root
        candidates.append(rec.data_path(rec.data.eval))
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        return None
    try:
        examples = read_examples(path, rec.data.format, rec.data.system_prompt)
    except UserError:
        return None
    pieces, n = [], 0
    for ex in examples:
        text = ex.text if ex.messages is None else render(tokenizer, ex.messages)
        pieces.append(text)
        n += len(tokenizer(text)["input_ids"])
        if n >= max_tokens:
            break
    return "".join(pieces), f"held-out data {path} ({len(pieces)} examples, {n} tokens)"
