"""GGUF export: the pure math against torch, the Modelfile against the real chat template,
bad input through the CLI, and real exports of the embedded model (plain and with a LoRA run)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from toolkit.cli import main
from toolkit.core.errors import UserError


# ---------------------------------------------------------------- pure math vs torch

def test_next_token_nll_and_perplexity_match_torch_cross_entropy():
    import numpy as np
    import torch

    from toolkit.export.verify import next_token_nll, perplexity

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(17, 50)).astype(np.float32) * 4
    ids = rng.integers(0, 50, size=17)
    ours = next_token_nll(logits, ids)
    ref = torch.nn.functional.cross_entropy(
        torch.tensor(logits[:-1], dtype=torch.float64), torch.tensor(ids[1:]), reduction="none"
    ).numpy()
    assert np.allclose(ours, ref, atol=1e-9)
    assert perplexity(ours) == pytest.approx(float(torch.exp(torch.tensor(ref).mean())), rel=1e-12)


def test_top1_agreement_and_relative_increase():
    import numpy as np

    from toolkit.export.verify import relative_increase, top1_agreement

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(40, 9)), rng.normal(size=(40, 9))
    expected = sum(int(np.argmax(a[i]) == np.argmax(b[i])) for i in range(40)) / 40
    assert top1_agreement(a, b) == expected
    assert top1_agreement(a, a) == 1.0
    assert relative_increase(10.5, 10.0) == pytest.approx(0.05)
    with pytest.raises(ValueError):
        top1_agreement(a, b[:5])


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


def test_check_quant_lists_valid_types():
    from toolkit.export.convert import QUANT_TYPES, check_quant

    assert check_quant("Q4_K_M") == "q4_k_m"
    with pytest.raises(UserError) as exc:
        check_quant("q3_xx")
    assert all(q in str(exc.value) for q in QUANT_TYPES)


# ---------------------------------------------------------------- Modelfile vs the real template

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a bond?"}],
    [{"role": "user", "content": "a\nb"}, {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
     {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}],
]


@pytest.fixture(scope="module")
def embedded_tok(embedded_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_dir)


def test_turn_format_replays_the_chat_template_exactly(embedded_tok):
    from toolkit.export.modelfile import render, turn_format

    fmt = turn_format(embedded_tok)
    assert fmt is not None
    assert fmt.default_system.startswith("You are a helpful AI assistant named SmolLM")
    for msgs in CONVERSATIONS:
        for gen in (False, True):
            want = embedded_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert render(fmt, msgs, gen) == want


def test_modelfile_text(embedded_tok):
    from toolkit.export.modelfile import modelfile_text

    text = modelfile_text("m-q8_0.gguf", embedded_tok, "<|im_end|>")
    assert text.startswith("FROM ./m-q8_0.gguf\n")
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert template.count("{{ if") == template.count("{{ end }}") - 1  # `range` closes with the last end
    assert "<|im_start|>user\n{{ .Content }}<|im_end|>\n" in template
    assert template.endswith("<|im_start|>assistant\n")
    assert '{{-' not in template  # trim markers would eat the template's newlines
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|im_start|>"' in text


def test_modelfile_without_expressible_template_claims_none(embedded_tok):
    import copy

    from toolkit.export.modelfile import modelfile_text, turn_format

    tok = copy.deepcopy(embedded_tok)
    # Content transformed by the template: no prefix/suffix format reproduces it.
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] | upper }}\n{% endfor %}"
    assert turn_format(tok) is None
    text = modelfile_text("m.gguf", tok, "<|im_end|>")
    assert "TEMPLATE" not in text and 'PARAMETER stop "<|im_end|>"' in text


TRAINED = "You are FinBot: answer finance questions in one sentence."


@pytest.mark.parametrize("tok_fixture, bos", [("embedded_tok", None), ("llama32_tokenizer_dir", "<|begin_of_text|>")],
                         ids=["chatml-with-default-system", "llama3-system-block-always"])
def test_modelfile_system_is_the_trained_prompt_and_renders_hf_text(request, tok_fixture, bos):
    """A fine-tune's system prompt is the Modelfile's SYSTEM: Ollama's prompt for a conversation
    without one equals HF's with that system message, and a request's own system message still wins."""
    from tests.export.ollama_template import modelfile_parts, ollama_prompt
    from toolkit.core.chat_tokens import end_of_turn_token
    from toolkit.core.models import load_tokenizer
    from toolkit.export.modelfile import modelfile_text

    tok = request.getfixturevalue(tok_fixture)
    tok = load_tokenizer(str(tok)) if isinstance(tok, Path) else tok
    text = modelfile_text("m.gguf", tok, end_of_turn_token(tok), system=TRAINED)
    assert text.count("SYSTEM") == 1 and modelfile_parts(text)[1] == TRAINED
    for msgs in CONVERSATIONS:
        own = [{"role": "system", "content": TRAINED}] if msgs[0]["role"] != "system" else []
        want = tok.apply_chat_template(own + msgs, tokenize=False, add_generation_prompt=True)
        assert ollama_prompt(text, msgs, bos=bos) == want


def test_modelfile_keeps_the_template_default_when_the_prompt_cannot_be_written(embedded_tok):
    from toolkit.export.modelfile import modelfile_text

    text = modelfile_text("m.gguf", embedded_tok, "<|im_end|>", system='Say """hi"""')
    assert 'Say """hi' not in text and "cannot sit in a Modelfile string" in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in text


def eog_texts_by_llama_cpp(llm) -> set[str]:
    """What llama.cpp itself marks end-of-generation in `llm`'s vocabulary, asked directly."""
    import llama_cpp

    model = llm._model
    return {model.token_get_text(i) for i in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(model.vocab, i)}


def modelfile_stops(modelfile: str) -> list[str]:
    """The Modelfile's `PARAMETER stop` strings, in order."""
    return [line.split('"', 1)[1][:-1] for line in modelfile.splitlines() if line.startswith("PARAMETER stop ")]


def test_stop_tokens_are_the_given_end_of_generation_texts(embedded_tok):
    """The stops after the end-of-turn token and the new-turn opener are the GGUF's end-of-generation
    texts the caller passes, whatever they are called, in their order, each once; a name from
    no fixed list (</s>, <|my_end|>) included."""
    from toolkit.export.modelfile import stop_tokens, turn_format

    fmt = turn_format(embedded_tok)
    eog = ["</s>", "<|im_end|>", "<|my_end|>", "<|endoftext|>", "</s>"]
    assert stop_tokens(embedded_tok, "<|im_end|>", fmt, eog) == [
        "<|im_end|>", "<|im_start|>", "</s>", "<|my_end|>", "<|endoftext|>"]
    assert stop_tokens(embedded_tok, "<|im_end|>", None, ["<|my_end|>"]) == ["<|im_end|>", "<|my_end|>"]
    # Not from the tokenizer: a special token of the vocabulary that the GGUF does not end on is no stop.
    assert stop_tokens(embedded_tok, "<|im_end|>", fmt) == ["<|im_end|>", "<|im_start|>"]


def test_modelfile_leaves_out_stops_it_cannot_write(embedded_tok):
    """Ollama's Modelfile parser has no escapes and drops non-printable runes: a stop holding a
    quote, a newline, a tab or an invisible character would come back as another string."""
    from toolkit.export.modelfile import modelfile_text

    eog = ["<|my_end|>", 'say "end"', "line\nbreak", "a\tb", "zero\u200bwidth", "", "back\\slash"]
    text = modelfile_text("m.gguf", embedded_tok, "<|im_end|>", eog=eog)
    assert modelfile_stops(text) == ["<|im_end|>", "<|im_start|>", "<|my_end|>", "back\\slash"]
    (note,) = [line for line in text.splitlines() if line.startswith("# Not stops")]
    assert "'say \"end\"'" in note and "'line\\nbreak'" in note and "'zero\\u200bwidth'" in note


def test_modelfile_stops_are_the_ggufs_end_of_generation_tokens(embedded_tok, embedded_f16_gguf):
    """SmolLM2: what the export reads from its GGUF (`gguf_eog_texts`) is what llama.cpp ends on."""
    from llama_cpp import Llama

    from toolkit.export.modelfile import modelfile_text
    from toolkit.export.pipeline import gguf_eog_texts

    llm = Llama(model_path=str(embedded_f16_gguf), vocab_only=True, verbose=False)
    try:
        eog = eog_texts_by_llama_cpp(llm)
    finally:
        llm.close()
    assert {"<|im_end|>", "<|endoftext|>"} <= eog
    stops = modelfile_stops(modelfile_text("m.gguf", embedded_tok, "<|im_end|>",
                                           eog=gguf_eog_texts(embedded_f16_gguf, "m.gguf")))
    assert stops[:2] == ["<|im_end|>", "<|im_start|>"] and len(stops) == len(set(stops))
    assert set(stops) == {"<|im_end|>", "<|im_start|>"} | eog


def test_unreadable_gguf_is_one_line_export_failure(tmp_path):
    from toolkit.export.pipeline import ExportFailed, gguf_eog_texts

    bad = tmp_path / "m-q8_0.gguf.tmp"
    bad.write_bytes(b"GGUF" + bytes(12))
    with pytest.raises(ExportFailed) as exc:
        gguf_eog_texts(bad, "m-q8_0.gguf")
    msg = str(exc.value)
    assert msg.startswith("m-q8_0.gguf: llama.cpp cannot read") and "\n" not in msg


def test_export_record_has_the_runs_system_prompt(tmp_path):
    """export.json records the recipe's data.system_prompt, and chat/generate on the exported GGUF
    read it back from there."""
    from toolkit.core.models import default_system_prompt, resolve
    from toolkit.export import report

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "run.json").write_text(json.dumps({"recipe": "finbot", "base_model": "embedded"}))
    (run / "recipe.yaml").write_text(f"data:\n  system_prompt: '{TRAINED}'\n")
    files = {"q8_0": "run-q8_0.gguf", "modelfile:q8_0": "Modelfile"}
    summary = report.summary(str(run), resolve(str(run)), "run", ["q8_0"], files, [], {}, {}, "float32")
    assert summary["system_prompt"] == TRAINED
    (run / "gguf").mkdir()
    (run / "gguf" / "run-q8_0.gguf").write_bytes(b"GGUF....")
    (run / "gguf" / "export.json").write_text(report.to_json(summary))
    assert json.loads((run / "gguf" / "export.json").read_text())["system_prompt"] == TRAINED
    assert default_system_prompt(str(run / "gguf" / "run-q8_0.gguf")) == TRAINED
    plain = report.summary("embedded", resolve("embedded"), "e", ["q8_0"], files, [], {}, {}, "float32")
    assert plain["system_prompt"] == ""


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
    import sys

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-m", "toolkit", "export", str(model_dir), "--quant", "q8_0", "--out", str(out)],
        cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
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


def _work_dir(out: Path, name: str, owner: dict | None = None, mib: int = 0) -> Path:
    """A work folder as an export makes it, with `owner` as its owner record and `mib` of data."""
    from toolkit.export.work_dirs import OWNER_FILE

    work = out / name
    (work / "hf").mkdir(parents=True)
    (work / "hf" / "model.safetensors").write_bytes(b"\0" * (mib * 1024**2))
    if owner is not None:
        (work / OWNER_FILE).write_text(json.dumps(owner))
    return work


def test_sweep_removes_what_a_dead_export_left_and_nothing_else(tmp_path):
    import os
    import sys

    from toolkit.export.work_dirs import owner_record, sweep_stale

    out = tmp_path / "out"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead_owner = owner_record(dead.pid)  # read while it runs: its start time is in the record
        dead.wait()
        stale = _work_dir(out, ".m.export-dead0001", dead_owner, mib=3)
        mine = _work_dir(out, ".m.export-mine0001", owner_record())
        running = _work_dir(out, ".m.export-live0001", owner_record(sleeper.pid))
        unowned = _work_dir(out, ".old.export-young001")  # an older toolkit's, changed just now
        (out / ".cache").mkdir()  # not a work folder: never looked at
        _work_dir(out, "m.export-nodot", dead_owner)
        (out / ".m.export-file").write_text("a file, not a folder")
        target = _work_dir(tmp_path, ".m.export-target", dead_owner)
        (out / ".m.export-link").symlink_to(target, target_is_directory=True)

        lines = []
        assert sweep_stale(out, lines.append) == [stale]
        assert len(lines) == 1, lines
        assert ".m.export-dead0001" in lines[0] and "3.0 MiB freed" in lines[0], lines
        assert ".old.export-young001" in lines[0] and "24 h" in lines[0], lines
        assert sorted(p.name for p in out.iterdir()) == sorted(
            [mine.name, running.name, unowned.name, ".cache", "m.export-nodot", ".m.export-file", ".m.export-link"])
        assert (target / "hf" / "model.safetensors").is_file()  # the link is not followed

        sleeper.kill()
        sleeper.wait()
        lines.clear()
        assert sweep_stale(out, lines.append) == [running]  # its owner is gone now
        assert mine.is_dir() and unowned.is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()
    if os.path.exists("/proc/self/stat"):
        # The dead owner's number handed to a new process (here: ours) is not that owner.
        reused = _work_dir(out, ".m.export-reused01", {**owner_record(), "start": "1"})
        assert sweep_stale(out, lambda m: None) == [reused]


def test_sweep_removes_an_unowned_folder_only_after_a_day_unchanged(tmp_path):
    import os

    from toolkit.export.work_dirs import sweep_stale

    out = tmp_path / "out"
    old = _work_dir(out, ".m.export-old00001", mib=1)
    young = _work_dir(out, ".m.export-young001")
    foreign = _work_dir(out, ".m.export-foreign1", {"pid": os.getpid(), "host": "another-machine"})
    day_ago = time.time() - 25 * 3600
    for work in (old, foreign):
        for p in [*work.rglob("*"), work]:
            os.utime(p, (day_ago, day_ago))
    # A fresh file deep inside is a running export's: the folder's own mtime alone would miss it.
    os.utime(young, (day_ago, day_ago))
    os.utime(young / "hf", (day_ago, day_ago))

    lines = []
    assert sorted(sweep_stale(out, lines.append)) == sorted([old, foreign])
    assert len(lines) == 1 and "2 of them without an owner record, unchanged for over 24 h" in lines[0], lines
    assert "1.0 MiB freed" in lines[0] and "kept .m.export-young001" in lines[0], lines
    assert [p.name for p in out.iterdir()] == [young.name]
    lines.clear()
    assert sweep_stale(out, lines.append) == [] and len(lines) == 1  # still kept, still said
    assert sweep_stale(tmp_path / "missing", lines.append) == []


def test_sweep_failure_is_a_warning(tmp_path, monkeypatch):
    import shutil
    import socket

    from toolkit.export.work_dirs import sweep_stale

    out = tmp_path / "out"
    # Above Linux's largest pid (2**22): no such process, ever.
    stale = _work_dir(out, ".m.export-dead0001", {"pid": 2**22 + 1, "host": socket.gethostname()})

    def refuse(path, **kw):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(shutil, "rmtree", refuse)
    lines = []
    assert sweep_stale(out, lines.append) == []
    assert lines == [f"warning: could not remove the stale export folder {stale}: Permission denied"]
    assert stale.is_dir()


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


def test_heldout_text_from_run_recipe(tmp_path, embedded_tok):
    from toolkit.export.verify_text import heldout_text

    run = tmp_path / "run"
    recipe_dir = tmp_path / "recipes" / "r"
    (recipe_dir / "d").mkdir(parents=True)
    run.mkdir()
    assert heldout_text(run, embedded_tok) is None  # no recipe.yaml: the caller uses the fixed text
    (run / "recipe.yaml").write_text("data:\n  train: d/train.jsonl\n")
    assert heldout_text(run, embedded_tok) is None  # no data.eval: none either
    # Mixed formats, each read by toolkit.finetune.data (format auto is decided per line).
    rows = [{"instruction": "Define APR.", "input": "", "output": "The yearly cost of a loan."},
            {"prompt": "What is CAGR?", "completion": "Compound annual growth rate."},
            {"text": "Plain prose about saving."}]
    (recipe_dir / "d" / "valid.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (run / "recipe.yaml").write_text("data:\n  train: d/train.jsonl\n  eval: d/valid.jsonl\n")
    (run / "run.json").write_text(json.dumps({"recipe": "r", "recipe_dir": str(recipe_dir)}))
    text, source = heldout_text(run, embedded_tok)
    assert "3 examples" in source and str(recipe_dir / "d" / "valid.jsonl") in source
    assert text.count("<|im_start|>assistant\n") == 2 and "The yearly cost of a loan.<|im_end|>" in text
    assert text.endswith("Plain prose about saving.")
    text2, _ = heldout_text(run, embedded_tok, max_tokens=5)
    assert text2.count("<|im_start|>user") == 1  # stops once max_tokens is reached


def test_heldout_text_falls_back_when_unreadable(tmp_path, embedded_tok):
    from toolkit.export.verify_text import heldout_text

    run = tmp_path / "run"
    (run / "d").mkdir(parents=True)
    (run / "d" / "valid.jsonl").write_text(json.dumps({"text": "ok"}) + "\nnot json\n")
    (run / "recipe.yaml").write_text("data:\n  eval: d/valid.jsonl\n")
    assert heldout_text(run, embedded_tok) is None  # a bad line: the fixed text, not a crash
    (run / "recipe.yaml").write_text("data:\n  eval_file: d/valid.jsonl\n")
    assert heldout_text(run, embedded_tok) is None  # not a recipe the reader accepts


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
