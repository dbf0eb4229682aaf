"""Start a fine-tune recipe from your own data.

  toolkit recipe new mychat --data chats.jsonl
  toolkit recipe new mychat --data hf:org/name:train --base HuggingFaceTB/SmolLM2-360M-Instruct
  toolkit recipe new mix --data a.jsonl --data b.parquet --eval heldout.jsonl

`new` detects the data format (messages, ShareGPT conversations, alpaca, prompt/completion,
prompt/response, question/answer, text; JSONL, JSON, CSV, Parquet, Arrow or an hf: dataset),
holds out a seeded tenth of the conversations when --eval is not given, tokenizes with the base
model's tokenizer, lets the memory planner size the run for this machine, and writes
recipes/NAME/recipe.yaml with every field commented. Then: toolkit finetune recipes/NAME --dry-run
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    new = sub.add_parser("new", help="write recipes/NAME/recipe.yaml for your data",
                         description=__doc__.split("\n\n")[2] if __doc__ else None)
    new.add_argument("name", metavar="NAME", help="recipe name (the folder recipes/NAME is created)")
    new.add_argument("--data", action="append", required=True, metavar="FILE_OR_DATASET",
                     help="training data: a .jsonl/.json/.csv/.tsv/.parquet/.arrow/.txt file or hf:org/name[:split]; "
                          "repeat to mix several")
    new.add_argument("--eval", default=None, metavar="FILE",
                     help="held-out data (default: a seeded tenth of the conversations is held out)")
    new.add_argument("--base", default=None, metavar="MODEL",
                     help="base model (default: the planner's pick on a GPU, `embedded` on CPU)")
    new.add_argument("--dir", default="recipes", help="where recipe folders go (default recipes)")


def run(args) -> int:
    from toolkit.finetune.scaffold import new_recipe

    found = new_recipe(args.name, args.data, args.eval, args.base, args.dir)
    print("\n".join(found.lines()))
    return 0
