"""GGUF export (toolkit/export/pipeline.py): sizing, bad input through the CLI, failures and stops
that leave nothing behind, and real exports of the embedded model (plain and with a LoRA run)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.export.test_modelfile import TRAINED, eog_texts_by_llama_cpp, modelfile_stops
from toolkit.cli import main
from toolkit.core.errors import UserError


# ---------------------------------------------------------------- sizing, the GGUF's end-of-generation tokens

def test_disk_needed_and_check_disk(tmp_path):
    from toolkit.export.pipeline import check_disk, disk_needed

    n = 100_000_000
    # fp32 HF folder 400 MB + f16 200 MB + q8_0 106.25 MB, +10%, +64 MiB
    assert disk_needed(n, ["q8_0"], 4) == int((400e6 + 200e6 + 106.25e6) * 1.1) + 64 * 1024**2
    # f16 output is the intermediate itself: no extra space
    assert disk_needed(n, ["f16"], 4) == int(600e6 * 1.1) + 64 * 1024**2
    assert check_disk(tmp_path, 1) > 0
    with pytest.raises(UserError, match="not enough disk space"):
        check_disk(tmp_path, 1 << 60)


def test_safetensors_params_matches_the_safetensors_library(embedded_dir, tiny_llama_dir):
    import math

    from safetensors import safe_open

    from toolkit.export.pipeline import safetensors_params

    for folder in (embedded_dir, tiny_llama_dir):
        with safe_open(str(folder / "model.safetensors"), framework="np") as f:
            want = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        assert safetensors_params(folder) == want
    assert 134_000_000 < safetensors_params(embedded_dir) < 135_000_000
    assert safetensors_params(tiny_llama_dir.parent) is None


def test_merge_dtype():
    from toolkit.export.pipeline import merge_dtype

    assert merge_dtype(1_000_000_000, 16 * 1024**3) == "float32"  # 6 GB needed, 16 GiB there
    assert merge_dtype(8_000_000_000, 16 * 1024**3) == "bfloat16"  # 48 GB needed
    assert merge_dtype(None, None) == "float32"


# ---------------------------------------------------------------- bad input via the CLI

def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_cli_missing_run(tmp_path, capsys):
    assert main(["export", str(tmp_path / "runs" / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "nope" in _one_error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_cli_run_without_adapter(tmp_path, capsys):
    run = tmp_path / "runs" / "finance-20260101-000000"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"recipe": "finance", "base_model": "embedded"}))
    assert main(["export", str(run)]) == 2
    assert "no adapter" in _one_error_line(capsys)
    assert not (run / "gguf").exists()


def test_cli_unknown_quant(capsys):
    assert main(["export", "embedded", "--quant", "q3_xx"]) == 2
    line = _one_error_line(capsys)
    assert "q3_xx" in line and "q4_k_m" in line and "q8_0" in line


def test_cli_unwritable_out_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["export", "embedded", "--quant", "q8_0", "--out", str(blocker / "sub")]) == 2
    assert "cannot write to output folder" in _one_error_line(capsys)


def test_cli_refuses_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "smollm2-135m-instruct-q8_0.gguf").write_text("old")
    assert main(["export", "embedded", "--quant", "q8_0", "--out", str(out)]) == 2
    assert "--force" in _one_error_line(capsys)
    assert (out / "smollm2-135m-instruct-q8_0.gguf").read_text() == "old"


def test_force_allows_existing_files_and_keeps_them_until_the_end(tmp_path):
    from toolkit.export.pipeline import _prepare_out_dir, planned_files

    out = tmp_path / "out"
    out.mkdir()
    files = planned_files("m", ["q8_0"])
    (out / files["q8_0"]).write_text("old")
    with pytest.raises(UserError, match="--force"):
        _prepare_out_dir(out, files, force=False)
    assert _prepare_out_dir(out, files, force=True) is False  # existed: never removed on failure
    assert (out / files["q8_0"]).read_text() == "old"  # replaced only by the final rename
    assert _prepare_out_dir(tmp_path / "new" / "o", files, force=False) is True


def test_not_enough_disk_on_a_small_filesystem(tmp_path, tiny_llama_dir, capsys):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a 2 MiB tmpfs needs root; check_disk itself is tested above")
    try:
        assert main(["export", str(tiny_llama_dir), "--quant", "q8_0", "--out", str(mnt / "o")]) == 2
        assert "not enough disk space" in _one_error_line(capsys)
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# ---------------------------------------------------------------- failures leave nothing behind

@pytest.mark.slow
def test_failed_verification_exits_1_and_writes_nothing(tmp_path, tiny_llama_dir, capsys):
    # A random tiny model converts and quantizes fine but cannot pass verification (its chat
    # turn never reaches <|im_end|>): the export must say which check failed and leave nothing.
    out = tmp_path / "out"
    assert main(["export", str(tiny_llama_dir), "--quant", "q8_0", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "verification failed" in err and "chat turn" in err
    assert not out.exists()


def test_interrupt_after_conversion_leaves_no_partial_gguf(tmp_path, tiny_llama_dir):
    from toolkit.export.pipeline import export_model

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user file")

    def progress(msg):
        if msg.startswith("[4/"):  # the f16 GGUF exists in the work folder by now
            assert any(p.name.endswith(".gguf.tmp") for p in out.rglob("*"))
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_model(str(tiny_llama_dir), ["q8_0"], out=out, progress=progress)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def _signal_while_converting(model_dir, out: Path, sig) -> subprocess.Popen:
    """`toolkit export` of `model_dir` into `out` in a subprocess, sent `sig` while the converter runs."""
    import os
    import signal
    import sys

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-m", "toolkit", "export", str(model_dir), "--quant", "q8_0", "--out", str(out)],
        cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
        # As from a terminal: a shell's background job (`make test &`) starts with SIGINT ignored, and the
        # child would inherit that and never see the Ctrl-C this test sends.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    for line in proc.stderr:  # progress lines are on stderr
        if line.startswith("[3/6]"):  # the converter subprocess is running now
            time.sleep(0.5)
            proc.send_signal(sig)
            break
    return proc


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_stop_during_conversion_leaves_nothing(tmp_path, tiny_llama_dir, sig, code):
    """Ctrl-C, and SIGTERM (timeout, docker stop), whose default action would skip the cleanup."""
    import signal

    out = tmp_path / "out"
    proc = _signal_while_converting(tiny_llama_dir, out, getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code and (sig != "SIGINT" or "interrupted" in err)
    assert not out.exists()


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_the_next_export_removes_what_a_killed_one_left(tmp_path, tiny_llama_dir):
    """SIGKILL (kill -9, the OOM killer) runs no cleanup at all: the work folder stays, and the
    next export into the same folder removes it before it starts."""
    import signal

    from toolkit.export.pipeline import export_model
    from toolkit.export.work_dirs import OWNER_FILE

    out = tmp_path / "out"
    proc = _signal_while_converting(tiny_llama_dir, out, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    left = [p for p in out.iterdir() if ".export-" in p.name]
    assert len(left) == 1 and (left[0] / OWNER_FILE).is_file() and (left[0] / "hf").is_dir()
    if Path("/proc/self/stat").exists():  # the converter died with it, instead of writing on
        deadline = time.monotonic() + 2
        while _processes_mentioning(str(out)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _processes_mentioning(str(out)) == []

    lines = []

    def progress(msg):
        lines.append(msg)
        if msg.startswith("[1/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_model(str(tiny_llama_dir), ["q8_0"], out=out, progress=progress)
    assert list(out.iterdir()) == []
    assert lines[0].startswith(f"removed 1 work folder left in {out} by killed exports: {left[0].name} ("), lines


# ---------------------------------------------------------------- real exports

def _lora_run(tmp_path: Path, embedded_dir: Path) -> Path:
    """A run folder per the fine-tune contract, made with PEFT directly: a LoRA with non-zero
    B matrices on the embedded model (so merging changes the weights), the tokenizer saved
    beside the adapter, and a recipe pointing at held-out chat data."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "runs" / "finance-20260101-000000"
    model = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(embedded_dir)
    torch.manual_seed(0)  # lora_A is initialized randomly inside get_peft_model
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.002)
    peft_model.save_pretrained(run / "adapter")
    tok.save_pretrained(run / "adapter")
    (run / "run.json").write_text(json.dumps({
        "recipe": "finance", "base_model": "embedded", "base_source": str(embedded_dir), "method": "lora",
        "created": "2026-01-01T00:00:00",
    }))
    (run / "data").mkdir()
    rows = [
        {"messages": [{"role": "user", "content": f"What is {x}?"},
                      {"role": "assistant", "content": f"{x.capitalize()} is a basic finance concept worth knowing well."}]}
        for x in ("inflation", "a dividend", "a mortgage", "an index fund", "a budget", "yield", "equity", "a bond")
    ]
    (run / "data" / "heldout.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    # A resolved recipe as the trainer writes it; no recipe_dir in run.json, so the data is found
    # beside it in the run folder.
    (run / "recipe.yaml").write_text("model:\n  base_model: embedded\ndata:\n  train: data/train.jsonl\n"
                                     f"  eval: data/heldout.jsonl\n  format: messages\n  system_prompt: '{TRAINED}'\n")
    return run


@pytest.mark.slow
def test_export_lora_run_f16_and_q8_0(tmp_path, embedded_dir, embedded_f16_gguf, capsys):
    from toolkit.export.verify import gguf_metadata

    run = _lora_run(tmp_path, embedded_dir)
    assert main(["export", str(run), "--quant", "q8_0,f16"]) == 0
    captured = capsys.readouterr()
    for step in range(1, 7):  # progress on stderr, results alone on stdout
        assert f"[{step}/6]" in captured.err and f"[{step}/6]" not in captured.out
    assert captured.out.splitlines()[:2] == ["wrote finance-20260101-000000-q8_0.gguf",
                                             "wrote finance-20260101-000000-f16.gguf"]
    out = run / "gguf"
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["Modelfile", "Modelfile.f16", "README.md", "export.json",
                            "finance-20260101-000000-q8_0.gguf", "finance-20260101-000000-f16.gguf"])
    summary = json.loads((out / "export.json").read_text())
    by_quant = {v["quant"]: v for v in summary["verification"]}
    assert "held-out data" in by_quant["f16"]["text_source"]
    f16, q8 = by_quant["f16"]["round_trip"], by_quant["q8_0"]["round_trip"]
    assert f16["same_ids"] and f16["top1_agreement"] >= 0.99 and abs(f16["ppl_rel"]) <= 0.005
    assert abs(q8["ppl_rel"]) <= 0.02
    for v in by_quant.values():
        assert v["chat"]["finish_reason"] == "stop" and v["failures"] == []
    meta = gguf_metadata(out / "finance-20260101-000000-q8_0.gguf")
    assert meta["eos_token"] == "<|im_end|>" and "<|im_start|>" in meta["chat_template"]
    readme = (out / "README.md").read_text()
    assert "finance" in readme and f"{f16['ppl_gguf']:.3f}" in readme and "lora" in readme
    assert (out / "Modelfile").read_text().startswith("FROM ./finance-20260101-000000-q8_0.gguf")
    assert summary["system_prompt"] == TRAINED and f'SYSTEM """{TRAINED}"""' in (out / "Modelfile.f16").read_text()
    # Each Modelfile stops where llama.cpp ends generation in its own GGUF, asked of llama.cpp here.
    from llama_cpp import Llama

    for modelfile, gguf in (("Modelfile", "q8_0"), ("Modelfile.f16", "f16")):
        llm = Llama(model_path=str(out / f"finance-20260101-000000-{gguf}.gguf"), vocab_only=True, verbose=False)
        try:
            eog = eog_texts_by_llama_cpp(llm)
        finally:
            llm.close()
        stops = modelfile_stops((out / modelfile).read_text())
        assert {"<|im_end|>", "<|endoftext|>"} <= eog and stops[:2] == ["<|im_end|>", "<|im_start|>"]
        assert set(stops) == {"<|im_end|>", "<|im_start|>"} | eog and len(stops) == len(set(stops))
        assert set(by_quant[gguf]["end_of_generation"]) == eog  # export.json records what the stops came from

    # The adapter is in the GGUF: the round trip above matched it to the merged model, and its
    # logits are clearly not the base model's (llama.cpp on the base's own f16 GGUF).
    import numpy as np

    from toolkit.export.verify import open_gguf

    ids = [1, 504, 1789, 282, 253, 5157, 314, 9045, 30]  # <|im_start|> and a few ordinary tokens
    logits = []
    for path in (embedded_f16_gguf, out / "finance-20260101-000000-f16.gguf"):
        llm = open_gguf(path, logits_all=True)
        try:
            llm.eval(ids)
            logits.append(np.array(llm.scores[: len(ids)]))
        finally:
            llm.close()
    assert np.abs(logits[0] - logits[1]).max() > 0.1

    # Second export into the same folder needs --force, then replaces the files.
    assert main(["export", str(run), "--quant", "q8_0"]) == 2
    assert "--force" in capsys.readouterr().err


# ---------------------------------------------------------------- the command's output

def test_quant_flag_accumulates():
    from toolkit.cli import build_parser
    from toolkit.commands.export import quant_list

    args = build_parser().parse_args(["export", "embedded", "--quant", "q8_0", "--quant", "F16,q4_0"])
    assert quant_list(args.quant) == ["q8_0", "f16", "q4_0"]
    assert quant_list(build_parser().parse_args(["export", "embedded"]).quant) == ["q4_k_m"]


def test_stdout_holds_results_only(monkeypatch, capsys):
    import toolkit.export.pipeline as pipeline

    summary = {"quants": ["q8_0"], "files": {"q8_0": "m-q8_0.gguf"}, "seconds": {"total": 1.0}, "out_dir": "/o"}

    def fake_export(spec, quants, out=None, force=False, progress=pipeline.say):
        progress("[1/6] loading")
        return summary

    monkeypatch.setattr(pipeline, "export_model", fake_export)
    assert main(["export", "embedded", "--quant", "q8_0"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "[1/6] loading\n"
    assert captured.out.splitlines() == ["wrote m-q8_0.gguf",
                                         "done in 1.0 s: q8_0 verified; Modelfile and README.md beside them in /o"]
    assert main(["export", "embedded", "--quant", "q8_0", "--json"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and json.loads(out[0]) == summary


@pytest.mark.parametrize("damage, file", [
    (lambda a: (a / "adapter_config.json").write_text("{broken"), "adapter_config.json"),
    (lambda a: (a / "adapter_model.safetensors").write_bytes(b""), "adapter_model.safetensors"),
], ids=["config-not-json", "weights-empty"])
def test_cli_damaged_adapter_is_one_line_and_writes_nothing(tmp_path, tiny_llama_dir, capsys, damage, file):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run = tmp_path / "runs" / "finance-20260101-000000"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                   LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(run / "adapter")
    (run / "run.json").write_text(json.dumps({"recipe": "finance", "base_model": str(tiny_llama_dir),
                                              "base_source": str(tiny_llama_dir)}))
    damage(run / "adapter")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    capsys.readouterr()
    assert main(["export", str(run), "--quant", "q8_0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the step lines, then one error line
    assert err[-1].startswith(f"error: {run / 'adapter' / file}: ") and not any("error" in e for e in err[:-1]), err
    after = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert after == before or set(after) - set(before) == {Path("gguf")} and not any((run / "gguf").iterdir())
