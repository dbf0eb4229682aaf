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


_HELDOUT_KEYS = ("eval", "held", "valid", "test")


def _recipe_data_files(recipe: dict) -> list[str]:
    """Paths under the recipe whose key names a held-out split (eval_file, heldout, valid...)."""
    found = []

    def walk(node, key=""):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}.{k}".lower())
        elif isinstance(node, list):
            for v in node:
                walk(v, key)
        elif isinstance(node, str) and node.endswith((".jsonl", ".json")):
            leaf = key.rsplit(".", 1)[-1]
            if any(w in leaf for w in _HELDOUT_KEYS):
                found.append(node)

    walk(recipe)
    return found


def _example_text(row: dict, tokenizer) -> str | None:
    if isinstance(row.get("messages"), list):
        return tokenizer.apply_chat_template(row["messages"], tokenize=False)
    if "instruction" in row and "output" in row:
        prompt = row["instruction"] + (("\n\n" + row["input"]) if row.get("input") else "")
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
        return tokenizer.apply_chat_template(msgs, tokenize=False)
    if "prompt" in row and "completion" in row:
        msgs = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
        return tokenizer.apply_chat_template(msgs, tokenize=False)
    if isinstance(row.get("text"), str):
        return row["text"]
    return None


def heldout_text(run_dir, tokenizer, max_tokens: int = 500) -> tuple[str, str] | None:
    """(text, source) from a run's held-out data, about `max_tokens` long, or None when the run
    records none. Relative paths in the run's resolved recipe.yaml are tried against the run
    folder, the recipe's own folder, then the working directory."""
    import json

    import yaml

    run_dir = Path(run_dir)
    recipe_file = run_dir / "recipe.yaml"
    if not recipe_file.is_file():
        return None
    try:
        recipe = yaml.safe_load(recipe_file.read_text()) or {}
        info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    except (OSError, ValueError, yaml.YAMLError):
        return None
    bases = [run_dir]
    for key in ("recipe_dir", "recipe_path", "source"):
        if isinstance(info.get(key), str):
            p = Path(info[key])
            bases.append(p if p.is_dir() else p.parent)
    if isinstance(info.get("recipe"), str):
        bases.append(Path.cwd() / "recipes" / info["recipe"])
    bases.append(Path.cwd())
    for rel in _recipe_data_files(recipe):
        for base in bases:
            path = (base / rel) if not Path(rel).is_absolute() else Path(rel)
            if not path.is_file():
                continue
            pieces, n = [], 0
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line) if line.strip() else None
                except ValueError:
                    continue
                text = _example_text(row, tokenizer) if isinstance(row, dict) else None
                if not text:
                    continue
                pieces.append(text)
                n += len(tokenizer(text)["input_ids"])
                if n >= max_tokens:
                    break
            if pieces:
                return "".join(pieces), f"held-out data {path} ({len(pieces)} examples, {n} tokens)"
    return None
