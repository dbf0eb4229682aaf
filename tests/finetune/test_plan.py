"""The one recipe -> planner mapping, and the one memory rule the pick and the fit check share."""

from __future__ import annotations

from pathlib import Path

import pytest

from toolkit.finetune import recipe
from toolkit.finetune.plan import plan_inputs

FINANCE = Path(__file__).resolve().parents[2] / "recipes" / "finance"


def test_finance_recipe_in_the_estimators_terms():
    gpu = recipe.load(FINANCE, gpu=True)
    p = plan_inputs(gpu, "cuda:0", "bfloat16")
    assert (p.task, p.quant, p.device, p.optimizer) == ("qlora", "nf4-dq", "cuda", "adamw")
    assert (p.seq_len, p.batch, p.lora_r, p.grad_ckpt) == (gpu.data.max_seq_len, gpu.training.batch_size, gpu.lora.r,
                                                          gpu.training.gradient_checkpointing)
    assert p.targets == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert p.lora_dropout == gpu.lora.dropout


@pytest.mark.parametrize("sets, device, dtype, quant", [
    (["method.double_quant=false"], "cpu", "bfloat16", "nf4"),
    (["method.name=lora"], "cpu", "float32", "fp32"),
    (["method.name=lora"], "cuda", "bfloat16", "bf16"),
    (["method.name=lora"], "cuda", "float16", "fp16"),
    # fp32 master weights under autocast; the finance CPU profile's LoRA+ does not apply to full
    (["method.name=full", "training.loraplus_lr_ratio=0"], "cuda", "bfloat16", "fp32"),
])
def test_quant_follows_method_and_dtype(sets, device, dtype, quant):
    assert plan_inputs(recipe.load(FINANCE, sets, gpu=False), device, dtype).quant == quant


def test_conversation_tokens_are_the_training_files_mean_example_when_packing(tmp_path):
    """The planner's packed attention keeps each conversation's probabilities: it gets the files' mean
    example (from their sizes, as run_shape counts tokens), at most max_seq_len; 0 without packing."""
    from toolkit.finetune.plan import CHARS_PER_TOKEN

    rec = recipe.load(FINANCE, gpu=False)
    lines = [line for line in (FINANCE / "train.jsonl").read_text().splitlines() if line.strip()]
    mean = sum(len(line) + 1 for line in lines) / CHARS_PER_TOKEN / len(lines)
    assert plan_inputs(rec, "cpu", "bfloat16").conversation_tokens == pytest.approx(mean, rel=0.01)
    assert 100 < mean < rec.data.max_seq_len
    short = recipe.load(FINANCE, ["data.max_seq_len=64"], gpu=False)
    assert plan_inputs(short, "cpu", "bfloat16").conversation_tokens == 64
    unpacked = recipe.load(FINANCE, ["data.packing=false"], gpu=False)
    assert plan_inputs(unpacked, "cpu", "bfloat16").conversation_tokens == 0


def test_conversation_tokens_of_the_tokenized_examples_else_unknown_for_hf_data():
    """Where the caller has tokenized the examples (the dry run, the trainer) their mean is the length;
    an hf: dataset, which a plan does not download, leaves it unknown (None: the planner prices the most)."""
    rec = recipe.load(FINANCE, gpu=False)
    assert plan_inputs(rec, "cpu", "bfloat16", [100, 200, 600]).conversation_tokens == 300
    assert plan_inputs(rec, "cpu", "bfloat16", [600, 700]).conversation_tokens == rec.data.max_seq_len
    hf = recipe.load(FINANCE, ["data.train=hf:org/chats"], gpu=False)
    assert plan_inputs(hf, "cpu", "bfloat16").conversation_tokens is None
    assert plan_inputs(hf, "cpu", "bfloat16", [120, 80]).conversation_tokens == 100
    mix = recipe.load(FINANCE, ["data.train=[{path: train.jsonl}, {path: 'hf:org/chats'}]"], gpu=False)
    assert plan_inputs(mix, "cpu", "bfloat16").conversation_tokens is None
    unpacked = recipe.load(FINANCE, ["data.train=hf:org/chats", "data.packing=false"], gpu=False)
    assert plan_inputs(unpacked, "cpu", "bfloat16").conversation_tokens == 0


def test_plan_takes_the_allocator_the_cpu_run_trains_under():
    """The runtime heap a CPU plan counts is that of the allocator `toolkit finetune` would train under on
    this machine (`allocator.training_allocator`, the same call the time model makes)."""
    from toolkit.core import allocator

    rec = recipe.load(FINANCE, gpu=False)
    assert plan_inputs(rec, "cpu", "bfloat16").allocator == allocator.training_allocator(allocator.detect())
    assert plan_inputs(rec, "cuda:0", "bfloat16").allocator == "glibc"


def test_named_targets_pass_through():
    rec = recipe.load(FINANCE, ["lora.target_modules=q_proj,v_proj"], gpu=False)
    assert plan_inputs(rec, "cpu", "float32").targets == ("q_proj", "v_proj")


def test_pick_and_fit_check_agree(monkeypatch):
    """For every machine size, `base_model: auto` picks a model exactly when the fit check would
    let that model train: both estimate the recipe's run and compare it with the same usable memory."""
    from toolkit.core import hardware
    from toolkit.estimate.pick import pick
    from toolkit.finetune.base_model import Unavailable, check_fits

    rec = recipe.load(FINANCE, gpu=False)
    p = plan_inputs(rec, "cpu", "float32")
    for gib in (1, 2, 3, 6, 12):
        machine = hardware.Hardware("cpu", "test box", gib * 2**30, gib * 2**30, "test")
        monkeypatch.setattr(hardware, "detect", lambda use_torch=False, m=machine: m)
        chosen = pick(p.task, machine.available_bytes, p.seq_len, p.batch, p.lora_r, p.device, quants=(p.quant,),
                      grad_ckpt=p.grad_ckpt, targets=p.targets, optimizer=p.optimizer, lora_dropout=p.lora_dropout,
                      compute=p.compute, packed_weights=p.packed_weights, conversation_tokens=p.conversation_tokens,
                      allocator=p.allocator)
        for cand in chosen.candidates:
            try:
                check_fits(rec, cand.model, "cpu", "float32")
                allowed = True
            except Unavailable:
                allowed = False
            assert allowed == cand.fits, (gib, cand.model)


def test_run_shape_counts_steps_and_tokens():
    from toolkit.finetune.plan import run_shape

    cpu = recipe.load(FINANCE, gpu=False)
    r = run_shape(cpu)
    assert r.steps == cpu.training.max_steps  # max_steps wins over epochs
    assert r.tokens_per_step == cpu.training.batch_size * cpu.training.grad_accum * cpu.data.max_seq_len
    from toolkit.finetune.plan import in_training_evals

    assert r.eval_rounds == len(in_training_evals(r.steps, cpu.eval.eval_steps, True)) and r.eval_tokens > 0
    assert r.report_tokens > r.eval_tokens  # the report's loss runs over every held-out example, base and tuned
    gpu = recipe.load(FINANCE, gpu=True)
    g = run_shape(gpu)
    # packed: the train file's tokens (bytes / CHARS_PER_TOKEN) in seq-long rows, epochs x rows / rows per step
    import math

    from toolkit.finetune.plan import CHARS_PER_TOKEN
    rows = math.ceil(int(gpu.data_path(gpu.data.train).stat().st_size / CHARS_PER_TOKEN) / gpu.data.max_seq_len)
    per_step = gpu.training.batch_size * gpu.training.grad_accum
    assert g.steps == math.ceil(gpu.training.epochs * math.ceil(rows / per_step))
    # the report's answers go 16 prompts a batch: 24 questions are 2 batches of 96 steps, base and tuned
    assert (gpu.eval.generation_samples, gpu.eval.max_new_tokens) == (24, 96) and g.report_decode_steps == 2 * 2 * 96
    assert r.report_decode_steps == 2 * math.ceil(cpu.eval.generation_samples / 16) * cpu.eval.max_new_tokens
    # rows a side in a batch, on average: the 24 questions make two batches of 12, the CPU's 16 one of 16
    assert (g.report_answer_rows, r.report_answer_rows) == (12.0, 16.0)
    few = run_shape(recipe.load(FINANCE, ["eval.generation_samples=5"], gpu=False))
    assert few.report_answer_rows == 5.0
    nopack = run_shape(recipe.load(FINANCE, ["data.packing=false"], gpu=True))
    assert nopack.tokens_per_step < g.tokens_per_step


def test_run_shape_prices_the_reports_prompts_near_what_the_report_prefills(tok):
    """The report's answers prefill their prompts, base and tuned, left-padded to each batch's
    longest: run_shape counts a held-out conversation's tokens for each (no tokenizer at hand there),
    which must stay within 2x of the real thing on the finance recipe."""
    import math

    from toolkit.finetune import data, report
    from toolkit.finetune.plan import run_shape
    from toolkit.finetune.scoring import ANSWER_BATCH

    rec = recipe.load(FINANCE, gpu=False)
    d = rec.data
    held = data.tokenize_split(tok, data.read_splits(rec)[1], d.max_seq_len, d.overlong, d.completion_only_loss, "eval")
    prompts = [q["prompt"] for q in report._questions(held, rec.eval.generation_samples)]
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    lengths = sorted(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)  # as scoring.greedy_answers
    padded = sum(max(lengths[i:i + ANSWER_BATCH]) * len(lengths[i:i + ANSWER_BATCH])
                 for i in range(0, len(lengths), ANSWER_BATCH))
    estimated = run_shape(rec).report_prompt_tokens
    assert math.isclose(estimated / (2 * padded), 1.5, rel_tol=1 / 3), (estimated, 2 * padded)


def test_run_shape_counts_the_report_loss_tokens_answer_loss_runs(tok):
    """The report's answer loss runs every held-out conversation, base and tuned, less the prefix they
    all share (the system prompt), which `scoring.answer_loss` runs once. run_shape estimates both
    from the file's bytes; on the finance recipe within 15% of the tokens counted by the tokenizer."""
    from toolkit.finetune import data, scoring
    from toolkit.finetune.plan import run_shape

    rec = recipe.load(FINANCE, gpu=False)
    d = rec.data
    held = data.tokenize_split(tok, data.read_splits(rec)[1], d.max_seq_len, d.overlong, d.completion_only_loss, "eval")
    shared = scoring.shared_prefix(held.input_ids, held.labels)
    real = 2 * sum(len(ids) - shared for ids in held.input_ids)
    assert shared > 0
    assert run_shape(rec).report_tokens == pytest.approx(real, rel=0.15)
    # With every token labelled the prefix is scored, so nothing is run apart.
    whole = run_shape(recipe.load(FINANCE, ["data.completion_only_loss=false"], gpu=False)).report_tokens
    assert whole > run_shape(rec).report_tokens


def test_run_shape_counts_the_reports_general_text_tokens(tok):
    """The report scores its general text (`report.GENERAL_TEXT`) on both sides, every position:
    run_shape counts it from its characters, within 15% of the tokenizer's count on the finance
    recipe, and not at all where no report runs."""
    from toolkit.finetune import report
    from toolkit.finetune.plan import run_shape

    rec = recipe.load(FINANCE, gpu=False)
    real = 2 * len(tok(report.GENERAL_TEXT)["input_ids"])  # as scoring.text_perplexity tokenizes it
    assert run_shape(rec).report_text_tokens == pytest.approx(real, rel=0.15)
    assert run_shape(recipe.load(FINANCE, ["eval.report=false"], gpu=False)).report_text_tokens == 0
    assert run_shape(recipe.load(FINANCE, ["data.eval="], gpu=False)).report_text_tokens == 0


def test_time_budget_field_is_validated(tmp_path):
    from toolkit.core.errors import UserError

    assert recipe.load(FINANCE, ["model.time_budget=1h30m"], gpu=False).model.time_budget == "1h30m"
    for bad in ("soon", "0", "-5m"):
        with pytest.raises(UserError, match="model.time_budget"):
            recipe.load(FINANCE, [f"model.time_budget={bad}"], gpu=False)


def test_auto_pick_honours_the_time_budget(monkeypatch):
    """`base_model: auto` with a budget too short for any model: nothing is picked, and the
    announcement names the time."""
    from toolkit.core import hardware
    from toolkit.estimate import timeplan
    from toolkit.finetune.base_model import Unavailable, _auto_pick

    machine = hardware.Hardware("cpu", "test box", 64 * 2**30, 64 * 2**30, "test")
    monkeypatch.setattr(hardware, "detect", lambda use_torch=False: machine)
    monkeypatch.setattr(timeplan, "rates_here", lambda dtype=None: timeplan.Rates("cpu", 100e9, 20e9, "test rates"))
    said = []
    rec = recipe.load(FINANCE, ["model.base_model=auto", "model.time_budget=90s"], gpu=False)
    with pytest.raises(Unavailable, match="memory and time"):
        _auto_pick(rec, said.append, "cpu", "float32")
    assert "would take" in said[0]
    rec = recipe.load(FINANCE, ["model.base_model=auto", "model.time_budget=20m"], gpu=False)
    model, info = _auto_pick(rec, said.append, "cpu", "float32")
    assert info["fits"] and model in ("embedded", "HuggingFaceTB/SmolLM2-360M-Instruct")


def test_method_auto_takes_lora_only_where_memory_is_plentiful():
    from toolkit.core.units import GIB
    from toolkit.finetune.plan import AUTO_LORA_SHARE, choose_method

    assert choose_method(3 * GIB, 20 * GIB)[0] == "lora"
    assert choose_method(int(AUTO_LORA_SHARE * 8 * GIB), 8 * GIB)[0] == "lora"
    assert choose_method(int(AUTO_LORA_SHARE * 8 * GIB) + 1, 8 * GIB)[0] == "qlora"
    method, why = choose_method(None, 20 * GIB)
    assert method == "qlora" and "doesn't know" in why


def test_resolve_method_uses_the_lora_estimate_of_the_base():
    from toolkit.core.units import GIB
    from toolkit.estimate.catalog import CATALOG
    from toolkit.estimate.planner import estimate
    from toolkit.finetune import recipe
    from toolkit.estimate.planner import usable_bytes
    from toolkit.finetune.plan import plan_inputs, resolve_method

    rec = recipe.load(FINANCE, gpu=False)
    assert rec.method.name == "auto"
    kw = dict(plan_inputs(rec, "cpu", "float32").as_kwargs(), task="lora", quant="fp32")
    need = estimate(CATALOG["embedded"], **kw).total_bytes
    plenty, tight = resolve_method(rec, "embedded", "cpu", "float32", 64 * GIB), \
        resolve_method(rec, "embedded", "cpu", "float32", int(need * 1.2))
    assert plenty[0].method.name == "lora" and tight[0].method.name == "qlora"
    assert usable_bytes(int(need * 1.2)) < need / 0.5
    assert rec.method.name == "auto"  # the loaded recipe is not changed in place
    same, why = resolve_method(recipe.load(FINANCE, gpu=True), "embedded", "cpu", "float32", GIB)
    assert same.method.name == "qlora" and why == ""


def test_an_estimator_refusal_is_reported_as_such(monkeypatch):
    """When the estimator refuses a run of a model it knows, `method: auto` and the dry run say
    what it refused, not that the model is unknown."""
    from toolkit.core.errors import UserError
    from toolkit.core.units import GIB
    from toolkit.estimate import planner
    from toolkit.finetune import dry_run
    from toolkit.finetune.plan import resolve_method

    def refuse(*a, **k):
        raise UserError("unknown LoRA target(s) foo")

    monkeypatch.setattr(planner, "estimate", refuse)
    rec = recipe.load(FINANCE, gpu=False)
    out, why = resolve_method(rec, "embedded", "cpu", "float32", 64 * GIB)
    assert out.method.name == "qlora" and "doesn't know" not in why
    assert "no estimate for embedded: unknown LoRA target(s) foo" in why
    est, no_estimate = dry_run.run_estimate(rec, "embedded", "cpu", "float32", 1.0, [100])
    assert est is None and "unknown LoRA target(s) foo" in no_estimate
    assert dry_run.run_estimate(rec, "not-a-catalog-model", "cpu", "float32", 1.0, [100]) == (None, "")


def test_in_training_evals_leave_the_ends_to_the_report():
    from toolkit.finetune.plan import in_training_evals

    assert in_training_evals(40, 10, report_ends=False) == [0, 10, 20, 30, 40]
    assert in_training_evals(40, 10, report_ends=True) == [10, 20, 30]  # the report measures 0 and 40
    assert in_training_evals(42, 10, report_ends=True) == [10, 20, 30, 40]
    assert in_training_evals(40, 0, report_ends=False) == []


def test_report_ends_unless_early_stopping_needs_the_last_eval():
    from toolkit.finetune.plan import report_ends
    from toolkit.finetune.recipe import EvalConfig

    assert report_ends(EvalConfig(report=True))
    assert not report_ends(EvalConfig(report=False))
    assert not report_ends(EvalConfig(report=True, eval_steps=5, early_stopping_patience=2))


def test_packed_rows_are_trls_rows():
    """Best fit decreasing, as TRL packs for the trainer: three 6s and three 4s fill three rows of 10; a
    longer example is cut to a row; and TRL packs 1,000 examples at a time (1,500 examples of 3 tokens
    make 334 + 167 rows, not the 500 one pass over all would make)."""
    from toolkit.finetune.plan import packed_rows

    assert sorted(packed_rows([6, 4, 6, 4, 6, 4], 10)) == [10, 10, 10]
    assert packed_rows([25, 3], 10) == [10, 3]
    rows = packed_rows([3] * 1500, 10)
    assert len(rows) == 501 and sum(rows) == 4500


def test_trained_work_counts_as_the_trainer_does():
    """Steps and tokens from the rows: ceil(rows / batch) micro-batches an epoch, ceil(of those /
    grad_accum) steps, ceil(epochs x steps an epoch) in all; max_steps wins; a partial last epoch."""
    from toolkit.finetune.plan import trained_work

    def rec(*sets):
        return recipe.load(FINANCE, ["training.batch_size=2", "training.grad_accum=2", "data.max_seq_len=20",
                                     "training.max_steps=-1", *sets], gpu=False)

    # 5 full rows: 3 micro-batches (2 + 2 + 1 rows) an epoch, 2 steps an epoch; 3 epochs, 300 tokens
    assert trained_work([20] * 5, rec("training.epochs=3")) == (6, 50, 300 / 9)
    # 1.5 epochs: ceil(1.5 x 2) steps, one epoch (100 tokens, 3 micro-batches) and a step of 2 (80)
    assert trained_work([20] * 5, rec("training.epochs=1.5")) == (3, 60, 180 / 5)
    assert trained_work([20] * 40, rec("training.max_steps=4"))[0] == 4
    # unpacked: a row an example, cut at max_seq_len (8 + 20 + 12), one epoch of 2 micro-batches of 2
    unpacked = rec("data.packing=false", "training.epochs=1", "training.grad_accum=1")
    assert trained_work([8, 60, 12], unpacked) == (2, 20, 20.0)


@pytest.mark.slow
def test_run_shape_counts_the_steps_and_tokens_the_trainer_runs(tmp_path, tiny_llama_dir):
    """The dry run's count (the tokenized examples packed as TRL packs them) against a real run's: the
    Trainer's optimizer steps and the tokens it saw, with grad_accum, several epochs and a partial step."""
    import json

    from toolkit.core.chat_tokens import fix_chat_special_tokens
    from toolkit.core.loading import load_tokenizer
    from toolkit.finetune import data
    from toolkit.finetune.plan import run_shape
    from toolkit.finetune.trainer import finetune
    from tests.finetune.conftest import make_recipe

    spec = make_recipe(tmp_path, tiny_llama_dir)
    # Short exchanges under the template's default system prompt: the files' bytes count a third of the
    # tokens here, and steps of best-fit rows differ from steps of full rows.
    (spec / "train.jsonl").write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus {i + 7}?"},
                                 {"role": "assistant", "content": f"{i} + {i + 7} = {2 * i + 7}."}]}) + "\n"
        for i in range(60)))
    sets = ["training.max_steps=-1", "training.epochs=2", "training.grad_accum=2", "data.max_seq_len=256",
            "eval.eval_steps=0", "eval.report=false", "lora.dropout=0"]
    rec = recipe.load(spec, sets, gpu=False)
    tok = load_tokenizer(str(tiny_llama_dir))
    fix_chat_special_tokens(tok)
    d = rec.data
    train = data.tokenize_split(tok, data.read_splits(rec)[0], d.max_seq_len, d.overlong, d.completion_only_loss)
    shape = run_shape(rec, [len(x) for x in train.input_ids])
    info = json.loads((finetune(spec, sets, runs_dir=tmp_path / "runs", gpu=False) / "run.json").read_text())
    assert shape.steps == info["steps"] and shape.steps % 2 == 0  # two epochs of the same steps
    assert abs(shape.tokens_per_step * shape.steps - info["tokens_seen"]) <= shape.steps  # rounded a step
    assert info["tokens_seen"] == 2 * train.n_tokens  # every token trained on, twice


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_plan_packs_where_the_trainer_packs(dtype):
    """`packed_weights` follows the trainer's own decision on this machine (`hardware.packed_choice`,
    the calibration's), and never for a GPU run or a full fine-tune, whose weights train."""
    from toolkit.core.hardware import packed_choice

    rec = recipe.load(FINANCE, ["method.name=lora"], gpu=False)
    assert plan_inputs(rec, "cpu", dtype).packed_weights == packed_choice("cpu", dtype, "train")[0]
    assert not plan_inputs(rec, "cuda", dtype).packed_weights
    full = recipe.load(FINANCE, ["method.name=full", "training.loraplus_lr_ratio=0"], gpu=False)
    assert not plan_inputs(full, "cpu", dtype).packed_weights


def test_file_stats_read_a_file_once_per_version(tmp_path, monkeypatch):
    """A dry run asks for the training files' counts from the plan and the time model: one read each
    version of a file, a new read when it changes."""
    from toolkit.finetune.plan import _file_stats

    f = tmp_path / "train.jsonl"
    f.write_text('{"text": "one"}\n{"text": "two"}\n')
    reads = []
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self) or real(self))
    first = _file_stats(f)
    assert _file_stats(f) == first and first[0] == 2 and len(reads) == 1
    f.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three"}\n')
    assert _file_stats(f)[0] == 3 and len(reads) == 2
    assert _file_stats(tmp_path / "missing.jsonl") == (0, 0, 0)
