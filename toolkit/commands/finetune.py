"""Fine-tune a model from a recipe (QLoRA by default) and write a run folder with a report.

  toolkit finetune recipes/finance
  toolkit finetune recipes/finance --set training.max_steps=20 --set lora.r=8
  toolkit finetune recipes/finance --resume        # continue an interrupted (Ctrl-C) run
  toolkit finetune recipes/finance --dry-run       # what a run would use; trains and writes nothing

Outputs go to runs/<recipe>-<YYYYmmdd-HHMMSS>/ (adapter, run.json, recipe.yaml, metrics.jsonl,
tb/, loss.png, report.json, report.md) and runs/latest points at the newest. Works under
`accelerate launch --num_processes 2 -m toolkit finetune ...` too.
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("recipe", help="recipe folder (recipes/finance), its recipe.yaml, or a recipe name")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe field, e.g. training.max_steps=20 (repeatable)")
    parser.add_argument("--runs-dir", default=None, help="where run folders go (default: the recipe's output.runs_dir, runs)")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
                        help="continue the newest interrupted run of this recipe (or the given .incomplete folder)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved recipe, data stats, one example with its loss mask, the model "
                             "that would be trained and the memory estimate; train and write nothing")


def run(args) -> int:
    if args.dry_run:
        import os
        import sys

        from toolkit.finetune.dry_run import dry_run

        color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        print("\n".join(dry_run(args.recipe, args.overrides).lines(color)))
        return 0
    if getattr(args, "process_entry", False):
        from toolkit.core import allocator

        allocator.relaunch()  # before torch allocates anything; see toolkit/core/allocator.py
    from toolkit.finetune.trainer import finetune

    out = finetune(args.recipe, args.overrides, runs_dir=args.runs_dir, resume=args.resume)
    print(out)
    return 0
