"""`toolkit estimate`: both forms, --json, one-line errors with exit 2, no torch import, speed."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.commands.conftest import ROOT, run_estimate


def test_pick_form_with_gpu_name(capsys):
    code, out, err = run_estimate(capsys, "--gpu", "RTX 3060 12GB")
    assert code == 0, err
    assert "Budget: 12.00 GiB" in out and "<- pick" in out
    assert out.count("nf4-dq") >= 10  # one row per pickable model
    pick_line = next(line for line in out.splitlines() if line.startswith("Pick:"))
    why = next(line for line in out.splitlines() if line.startswith("Why:"))
    assert pick_line.split()[1] in why and "safety margin" in why


def test_pick_form_json_and_detected_hardware(capsys):
    code, out, _ = run_estimate(capsys, "--task", "inference", "--json")
    assert code == 0
    d = json.loads(out)
    assert {"model", "quant", "fits", "headroom_bytes", "reason", "candidates", "budget_bytes", "device"} <= set(d)
    assert d["budget_bytes"] > 0 and d["device"] in ("cpu", "cuda")
    dense = "fp32" if d["device"] == "cpu" else "bf16"  # the dtype the toolkit decodes in there
    assert {c["quant"] for c in d["candidates"]} == {dense, "q8_0", "q4_k_m"}


def test_model_form_breakdown(capsys):
    code, out, _ = run_estimate(capsys, "--model", "meta-llama/Llama-3.2-1B-Instruct", "--task", "qlora",
                        "--seq-len", "1024", "--batch", "2", "--lora-r", "8", "--no-grad-ckpt", "--vram", "8GB")
    assert code == 0
    for word in ("weights", "activations", "logits", "optimizer", "lora_adapter", "total", "grad ckpt off",
                 "LoRA r8", "seq 1024 x batch 2", "budget 8.00 GiB"):
        assert word in out, word


def test_model_form_json_fields(capsys):
    code, out, _ = run_estimate(capsys, "--model", "embedded", "--task", "lora", "--quant", "bf16", "--gpu", "T4 16GB", "--json")
    assert code == 0
    d = json.loads(out)
    assert d["model"] == "embedded" and d["task"] == "lora" and d["quant"] == "bf16" and d["fits"] is True
    assert d["total_bytes"] == sum(d["components"].values())
    # the pick's rule: the budget minus the 10% safety margin
    assert d["budget_bytes"] == 16 * 1024**3 and d["usable_bytes"] == int(0.9 * d["budget_bytes"])
    assert d["headroom_bytes"] == d["usable_bytes"] - d["total_bytes"]


def test_model_form_gguf_file(capsys):
    from toolkit.core.models import embedded_gguf_path

    code, out, _ = run_estimate(capsys, "--model", str(embedded_gguf_path()), "--task", "inference", "--seq-len", "4096", "--json")
    d = json.loads(out)
    assert code == 0 and d["quant"] == "q4_1" and d["backend"] == "llama.cpp"
    assert set(d["components"]) == {"weights", "kv_cache", "compute_buffer", "output_buffer", "framework"}


def test_grad_ckpt_flags(capsys):
    on = json.loads(run_estimate(capsys, "--model", "embedded", "--json", "--grad-ckpt")[1])
    off = json.loads(run_estimate(capsys, "--model", "embedded", "--json", "--no-grad-ckpt")[1])
    assert on["grad_ckpt"] is True and off["grad_ckpt"] is False
    assert on["components"]["activations"] < off["components"]["activations"]


@pytest.mark.parametrize("argv,needle", [
    (["--model", "llama-3.2-1b-instrct"], "did you mean meta-llama/Llama-3.2-1B-Instruct"),
    (["--vram", "eight"], "cannot read 'eight' as a size"),
    (["--vram=-3GB"], "must be positive"),
    (["--vram", "0"], "must be positive"),
    (["--vram", "8GB", "--gpu", "T4 16GB"], "either --vram or --gpu"),
    (["--gpu", "RTX 9999"], "unknown GPU"),
    (["--gpu", "RTX 3060"], "several sizes"),
    (["--model", "embedded", "--batch", "0"], "--batch must be a positive integer"),
    (["--model", "embedded", "--seq-len", "-5"], "--seq-len must be a positive integer"),
    (["--model", "embedded", "--lora-r", "2.5"], "--lora-r must be a positive integer"),
    (["--seq-len", "abc"], "--seq-len must be a positive integer"),
    (["--task", "train"], "--task must be one of"),
    (["--model", "embedded", "--task", "lora", "--quant", "q4_k_m"], "does not go with --task lora"),
    (["--model", "embedded", "--optimizer", "sgd"], "--optimizer must be one of"),
    (["--quant", "nf4"], "--quant needs --model"),
    (["--model", ""], "--model is empty"),
    (["--gpu", ""], "--gpu is empty"),
    (["--recipe", "recipes/finance", "--seq-len", "4096"], "--seq-len does not go with --recipe"),
    (["--recipe", "recipes/finance", "--model", "embedded", "--no-grad-ckpt"], "--grad-ckpt/--no-grad-ckpt does not"),
])
def test_bad_input_is_one_line_exit_2(capsys, argv, needle):
    code, out, err = run_estimate(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
    assert "Traceback" not in err and out == ""


def test_bad_paths_are_one_line_exit_2(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    notgguf = tmp_path / "weights.gguf"
    notgguf.write_bytes(b"\x00" * 64)
    for path, needle in ((tmp_path / "empty", "no config.json"), (notgguf, "not a GGUF file")):
        code, _, err = run_estimate(capsys, "--model", str(path))
        assert code == 2 and err.count("\n") == 1 and needle in err, err


def _timed(argv: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    code = ("import sys, runpy; sys.argv = ['toolkit'] + sys.argv[1:]\n"
            "from toolkit.cli import main\nrc = main()\n"
            "heavy = [m for m in ('torch', 'transformers', 'gradio', 'llama_cpp', 'bitsandbytes') if m in sys.modules]\n"
            "assert not heavy, heavy\nsys.exit(rc)")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)
    return time.perf_counter() - t0, proc


@pytest.mark.parametrize("argv", [
    ["estimate", "--help"],
    ["estimate", "--vram", "8GB"],
    ["estimate"],
    ["estimate", "--model", "meta-llama/Llama-3.1-8B-Instruct", "--task", "qlora", "--json"],
    ["estimate", "--model", "GGUF", "--task", "inference"],
])
def test_cli_is_fast_and_never_imports_torch(argv):
    from toolkit.core.models import embedded_gguf_path

    argv = [str(embedded_gguf_path()) if a == "GGUF" else a for a in argv]
    wall, proc = _timed(argv)
    assert proc.returncode == 0, proc.stderr
    assert wall < 1.5, f"{argv}: {wall:.2f} s"


@pytest.mark.parametrize("argv,needle", [
    (["--time-budget", "soon"], "--time-budget: cannot read 'soon'"),
    (["--time-budget", "0"], "--time-budget: must be positive"),
    (["--time-budget=-5m"], "--time-budget: must be positive"),
    (["--target-modules", "q_proj,foo_proj"], "--target-modules: unknown module foo_proj"),
    (["--model", "embedded", "--target-modules", "attn"], "--target-modules: unknown module attn"),
    (["--recipe", "README.md"], "--recipe README.md"),
    (["--recipe", "toolkit"], "--recipe toolkit"),
])
def test_time_and_recipe_bad_input_is_one_line_exit_2(capsys, argv, needle):
    code, out, err = run_estimate(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
    assert out == ""


def test_model_form_reports_time_and_allocated_for_a_named_gpu(capsys):
    code, out, _ = run_estimate(capsys, "--model", "Llama-3.2-1B", "--task", "lora", "--quant", "bf16", "--gpu", "A10G",
                        "--target-modules", "q_proj,v_proj", "--lora-r", "32", "--no-grad-ckpt", "--json")
    assert code == 0
    d = json.loads(out)
    assert d["allocated_bytes"] == d["total_bytes"] - d["components"]["framework"]
    t = d["time"]
    assert "A10G 24GB datasheet" in t["source"]
    assert t["train_tokens_per_s"] > 1000 and t["decode_tokens_per_s"] > 50 and t["prefill_s"] > 0
    assert "train_wall_s" not in t  # no recipe, no run to time


def test_recipe_sets_the_estimate_and_times_itsrun_estimate(capsys):
    code, out, _ = run_estimate(capsys, "--model", "embedded", "--recipe", "recipes/finance", "--gpu", "RTX 4060 8GB", "--json")
    assert code == 0
    d = json.loads(out)
    # the recipe's GPU settings (plan_inputs): QLoRA nf4 double quant, seq 512, batch 8, r16
    assert (d["task"], d["quant"], d["seq_len"], d["batch"], d["lora_r"]) == ("qlora", "nf4-dq", 512, 8, 16)
    from toolkit.finetune import recipe

    rec = recipe.load("recipes/finance", gpu=True)
    t = d["time"]
    assert t["steps"] > 0 and t["tokens_per_step"] == rec.training.batch_size * rec.training.grad_accum * 512
    assert t["train_wall_s"] > t["steps"] * t["tokens_per_step"] / t["train_tokens_per_s"]


def test_pick_with_a_gpu_and_a_tight_time_budget_names_the_time_limit(capsys):
    code, out, _ = run_estimate(capsys, "--gpu", "T4 16GB", "--time-budget", "2m")
    assert code == 0
    why = next(line for line in out.splitlines() if line.startswith("Why:"))
    assert "would take" in why and "Time: budget 2 min" in out


def test_seq_len_past_the_models_context_window_is_warned(capsys):
    code, out, err = run_estimate(capsys, "--model", "embedded", "--seq-len", "100000")
    assert code == 0 and "seq 100000" in out
    assert err == ("warning: --seq-len 100000 is past embedded's context window (8192 tokens); the estimate is "
                   "for a length the model was not trained for\n")
    code, out, err = run_estimate(capsys, "--model", "embedded", "--seq-len", "100000", "--json")
    assert code == 0 and json.loads(out)["warnings"] == [err.removeprefix("warning: ").strip()]
    code, out, err = run_estimate(capsys, "--model", "embedded", "--seq-len", "8192", "--json")
    assert code == 0 and err == "" and json.loads(out)["warnings"] == []


def test_pick_skips_models_whose_context_window_the_seq_len_is_past(capsys):
    # 7.2 GiB usable at 16k tokens: SmolLM2-1.7B (8k context) fits the memory but can't take the sequence
    from toolkit.estimate.catalog import CATALOG

    code, out, err = run_estimate(capsys, "--vram", "8GB", "--seq-len", "16384", "--json")
    assert code == 0
    d = json.loads(out)
    assert d["fits"] and CATALOG[d["model"]].max_context >= 16384
    short = [c for c in d["candidates"] if CATALOG[c["model"]].max_context < 16384]
    assert short and not any(c["fits"] for c in short) and any(c["headroom_bytes"] > 0 for c in short)
    assert d["warnings"] == [err.removeprefix("warning: ").strip()]
    assert err.startswith("warning: --seq-len 16384 is past the context windows of embedded, ") and "(8192 tokens)" in err
    assert "the pick skips them" in err and "has a context window of 8192 tokens" in d["reason"]
    code, out, err = run_estimate(capsys, "--vram", "8GB", "--seq-len", "16384")
    assert "SmolLM2-1.7B-Instruct nf4-dq" not in next(line for line in out.splitlines() if line.startswith("Pick:"))
    assert "past the context windows" in err
    code, out, err = run_estimate(capsys, "--vram", "80GB", "--seq-len", "200000", "--task", "inference", "--json")
    d = json.loads(out)
    assert not d["fits"] and "no model takes 200000 tokens" in d["reason"] and len(d["warnings"]) == 3
    code, out, err = run_estimate(capsys, "--vram", "8GB", "--json")
    assert json.loads(out)["warnings"] == [] and err == ""


def test_model_form_and_pick_agree_on_fit_and_headroom(capsys):
    # Qwen2.5-7B QLoRA at 2048 tokens needs ~7.3 GiB: inside 8 GiB, outside the 7.2 GiB the margin leaves
    args = ("--gpu", "RTX 4060 8GB", "--seq-len", "2048", "--json")
    pick = json.loads(run_estimate(capsys, *args)[1])
    row = next(c for c in pick["candidates"] if c["model"] == "Qwen/Qwen2.5-7B-Instruct")
    one = json.loads(run_estimate(capsys, "--model", "Qwen/Qwen2.5-7B-Instruct", *args)[1])
    assert one["total_bytes"] == row["total_bytes"] < one["budget_bytes"]
    assert (one["fits"], one["headroom_bytes"], one["usable_bytes"]) == (False, row["headroom_bytes"], pick["usable_bytes"])
    code, out, _ = run_estimate(capsys, "--model", "Qwen/Qwen2.5-7B-Instruct", *args[:-1])
    line = out.splitlines()[-1]
    assert code == 0 and "7.20 GiB usable after the 10% safety margin: does NOT fit, headroom -0." in line
    assert "left of the whole budget, with no margin" in line


def test_pick_with_a_recipe_shows_the_recipes_settings(capsys):
    code, out, _ = run_estimate(capsys, "--recipe", "recipes/finance", "--gpu", "RTX 4060 8GB")
    assert code == 0 and "Task: qlora, seq 512 x batch 8, LoRA r16" in out  # the recipe's GPU batch, not --batch's
    d = json.loads(run_estimate(capsys, "--recipe", "recipes/finance", "--gpu", "RTX 4060 8GB", "--json")[1])
    assert (d["seq_len"], d["batch"], d["lora_r"]) == (512, 8, 16)


def test_a_time_budget_that_cannot_apply_is_warned_not_claimed(capsys):
    code, out, err = run_estimate(capsys, "--vram", "8GB", "--time-budget", "5m")
    assert code == 0 and "budget 5 min" not in out and "Time:" not in out
    assert err == "warning: --time-budget 5m is not applied: no speed is known for --vram 8GB\n"
    d = json.loads(run_estimate(capsys, "--vram", "8GB", "--time-budget", "5m", "--json")[1])
    assert d["time_budget_s"] is None and d["warnings"] == [err.removeprefix("warning: ").strip()]
    code, out, err = run_estimate(capsys, "--model", "embedded", "--time-budget", "5m")
    assert code == 0 and "--time-budget 5m is not applied" in err


def test_list_gpus_json(capsys):
    code, out, _ = run_estimate(capsys, "--list-gpus", "--json")
    assert code == 0 and json.loads(out)["RTX 3090 24GB"] == 24 * 1024**3


def test_redirected_output_is_utf8_whatever_the_locale():
    """`toolkit estimate > plan.txt` prints "—" and "·": in the locale's encoding (a C locale's
    ASCII; Windows' cp932) that raised UnicodeEncodeError, in --help already."""
    from tests.ascii_locale import run_toolkit

    proc = run_toolkit("estimate", "--vram", "8GB", "--task", "inference")
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert "Budget: 8.00 GiB — --vram 8GB" in proc.stdout.decode("utf-8")
    assert "—" in run_toolkit("estimate", "--help").stdout.decode("utf-8")


def test_the_pick_table_says_why_a_model_is_not_taken(capsys):
    """`fits` reads `no` only for memory: a model that fits in memory but is past the time budget
    reads `time`, one whose context window the sequence is past reads `ctx`."""
    def marks(*argv):
        code, out, _ = run_estimate(capsys, *argv)
        assert code == 0
        rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0] in _MODELS]
        return {r[0]: r[5] for r in rows}

    timed = marks("--gpu", "RTX 3060 12GB", "--time-budget", "4m")
    assert timed["meta-llama/Llama-3.1-8B-Instruct"] == "time" and "no" not in timed.values()
    ctx = marks("--vram", "8GB", "--seq-len", "16384")
    assert ctx["embedded"] == "ctx" and ctx["meta-llama/Llama-3.1-8B-Instruct"] == "no"


_MODELS = ("embedded", "HuggingFaceTB/SmolLM2-360M-Instruct", "Qwen/Qwen2.5-0.5B-Instruct",
           "meta-llama/Llama-3.2-1B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct", "HuggingFaceTB/SmolLM2-1.7B-Instruct",
           "Qwen/Qwen2.5-3B-Instruct", "meta-llama/Llama-3.2-3B-Instruct", "Qwen/Qwen2.5-7B-Instruct",
           "meta-llama/Llama-3.1-8B-Instruct")


def test_a_recipe_with_method_auto_says_how_it_was_estimated(capsys):
    """The finance recipe's CPU profile has `method: auto`, estimated as its QLoRA branch: the
    estimate says so (a run may take plain LoRA), in both forms; its GPU profile names qlora."""
    recipe = str(ROOT / "recipes" / "finance")
    code, out, _ = run_estimate(capsys, "--recipe", recipe, "--json")  # this CPU-only machine: the cpu: profile
    assert code == 0 and any("method auto" in n for n in json.loads(out)["notes"])
    code, out, _ = run_estimate(capsys, "--recipe", recipe, "--model", "embedded")
    assert "note: method auto: estimated as qlora" in out
    code, out, _ = run_estimate(capsys, "--recipe", recipe, "--gpu", "RTX 3060 12GB", "--json")
    assert json.loads(out)["notes"] == []


@pytest.mark.parametrize("kind,argv,cached,restarts", [
    ("cpu", ["--calibrate"], True, True),               # measures: under the toolkit's allocator
    ("cpu", [], False, True),                           # about to measure a machine not in the cache
    ("cpu", ["--model", "embedded"], False, True),
    ("cpu", [], True, False),                           # answers from the cache: nothing to restart for
    ("cpu", ["--gpu", "RTX 3060 12GB"], False, False),  # a datasheet's rates, no calibration
    ("cpu", ["--vram", "8GB"], False, False),
    ("cpu", ["--list-gpus"], False, False),
    ("cuda", ["--calibrate"], False, False),            # a GPU's calibration: no host probe, no CPU allocator
])
def test_estimate_calibrates_under_the_allocator_the_toolkits_cpu_work_runs_under(monkeypatch, kind, argv, cached,
                                                                                   restarts):
    """The host-work probe reads ~25% apart under glibc's malloc and tcmalloc (docs/estimate.md), and
    `toolkit finetune` and a transformers model's generate / chat / serve restart under the toolkit's
    allocator before they calibrate: `toolkit estimate` does too where it is about to measure a CPU,
    and only when started from the shell (`allocator.relaunch` re-runs the process)."""
    from toolkit.cli import build_parser
    from toolkit.commands import estimate as E
    from toolkit.core import allocator, calibration, hardware

    calls = []
    monkeypatch.setattr(hardware, "detect", lambda: hardware.Hardware(kind, "test", 2**34, 2**34, "test"))
    monkeypatch.setattr(allocator, "relaunch", lambda: calls.append("relaunch"))
    monkeypatch.setattr(calibration, "cached", lambda cap=None: cached)
    args = build_parser().parse_args(["estimate", *argv])
    args.process_entry = True
    E._measure_under_the_allocator(args)
    assert calls == (["relaunch"] if restarts else [])
    args.process_entry = False  # called from Python (main(argv)): never restarted
    calls.clear()
    E._measure_under_the_allocator(args)
    assert calls == []
