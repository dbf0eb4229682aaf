"""`toolkit estimate`'s compute dtype: the one the toolkit trains or answers in on that device (a
GTX 10xx's fp32, an AVX2 CPU's fp32, a detected GPU's from nvidia-smi without torch, a dense --quant's)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.commands.conftest import ROOT, run_estimate


def test_a_gtx_10xx_is_estimated_in_the_fp32_it_trains_in(capsys):
    """A GTX 1080 Ti runs fp16 at 1/64 of fp32, so the toolkit trains there in fp32
    (capability.choose_dtype): the estimate holds QLoRA's unquantized weights and activations in
    fp32, times it at the card's fp32 rate, and says why; an RTX 3060 stays bf16."""
    args = ("--model", "meta-llama/Llama-3.2-1B-Instruct", "--task", "qlora", "--seq-len", "1024", "--json")
    _, out, _ = run_estimate(capsys, *args, "--gpu", "GTX 1080 Ti")
    pascal = json.loads(out)
    _, out, _ = run_estimate(capsys, *args, "--gpu", "RTX 3060 12GB")
    ampere = json.loads(out)
    assert pascal["compute_dtype"] == "fp32" and "sm61" in pascal["compute_reason"]
    assert ampere["compute_dtype"] == "bf16"
    assert pascal["components"]["weights"] > ampere["components"]["weights"]
    assert pascal["components"]["activations"] > ampere["components"]["activations"]
    assert "11.3 TFLOPS fp32" in pascal["time"]["source"]
    code, out, _ = run_estimate(capsys, "--gpu", "GTX 1080 Ti", "--task", "lora", "--json")
    assert code == 0 and {c["quant"] for c in json.loads(out)["candidates"]} == {"fp32"}
    _, out, _ = run_estimate(capsys, "--model", "embedded", "--task", "qlora", "--gpu", "GTX 1080 Ti")
    assert "compute fp32" in out and "note: fp32: GTX 1080 Ti 11GB (sm61)" in out


def test_a_cpu_without_native_bf16_is_estimated_in_fp32(capsys, monkeypatch):
    """The dense tasks' default quant is the dtype the toolkit computes in on this machine: an AVX2
    record (forced) trains in fp32, so `--task lora` estimates an fp32 base, as the trainer loads it."""
    monkeypatch.setenv("TOOLKIT_CPU_CAPABILITY", "avx2")
    code, out, _ = run_estimate(capsys, "--model", "embedded", "--task", "lora", "--json")
    d = json.loads(out)
    assert code == 0 and d["quant"] == "fp32" and d["compute_dtype"] == "fp32" and "no native bf16" in d["compute_reason"]
    code, out, _ = run_estimate(capsys, "--model", "embedded", "--task", "qlora", "--json")
    assert json.loads(out)["compute_dtype"] == "fp32"
    monkeypatch.setenv("TOOLKIT_CPU_CAPABILITY", "avx512_bf16")
    code, out, _ = run_estimate(capsys, "--model", "embedded", "--task", "lora", "--json")
    assert json.loads(out)["quant"] == "bf16"


@pytest.mark.parametrize("compute_cap,want", [("6.1", "fp32"), ("8.6", "bf16"), (None, "bf16")])
def test_a_detected_gpu_decides_the_dtype_from_nvidia_smi_without_torch(tmp_path, compute_cap, want):
    """On a machine with a GPU, the pick for inference (nothing to time) asks nvidia-smi for the
    compute capability, not torch: a GTX 1080 Ti answers in fp32, an RTX 3060 in bf16, and an old
    driver that knows no `compute_cap` field leaves the bf16 assumption, said as such."""
    fake = tmp_path / "nvidia-smi"
    cap = f'echo "{compute_cap}"' if compute_cap else 'echo "Field \\"compute_cap\\" is not a valid field" >&2; exit 2'
    fake.write_text("#!/bin/sh\ncase \"$1\" in\n  --query-gpu=compute_cap) " + cap + " ;;\n"
                    "  *) echo \"NVIDIA GeForce GTX 1080 Ti, 11264, 11000\" ;;\nesac\n")
    fake.chmod(0o755)
    import os

    code = ("import sys, json, io, contextlib; sys.argv = ['toolkit'] + sys.argv[1:]\n"
            "from toolkit.cli import main\nout = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n    rc = main()\n"
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
            "assert not heavy, heavy\nd = json.loads(out.getvalue())\nprint(d['compute_dtype'], '|', d['compute_reason'])\n"
            "sys.exit(rc)")
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, "-c", code, "estimate", "--task", "inference", "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    dtype, reason = proc.stdout.strip().split(" | ")
    assert dtype == want, reason
    assert ("nvidia-smi gives no compute capability" in reason) == (compute_cap is None)


def test_a_dense_quant_is_the_dtype_a_lora_base_or_an_answering_model_computes_in(capsys):
    """LoRA and transformers inference load the base in the dtype they compute in: `--quant fp16` on
    a GTX 1080 is fp16 compute, timed at that card's fp16 rate, and `--quant fp32` on an RTX 3090 is
    fp32; QLoRA keeps the device's compute whatever its 4-bit quant."""
    def ask(*argv):
        code, out, err = run_estimate(capsys, "--model", "embedded", "--json", *argv)
        assert code == 0, err
        return json.loads(out)

    d = ask("--task", "lora", "--quant", "fp16", "--gpu", "GTX 1080 8GB")
    assert (d["quant"], d["compute_dtype"], d["compute_reason"]) == ("fp16", "fp16", "fp16: set by --quant")
    assert "0.139 TFLOPS 16-bit" in d["time"]["source"]
    d = ask("--task", "inference", "--quant", "fp32", "--gpu", "RTX 3090")
    assert d["compute_dtype"] == "fp32" and "35.6 TFLOPS fp32" in d["time"]["source"]
    d = ask("--task", "qlora", "--quant", "nf4", "--gpu", "GTX 1080 8GB")
    assert d["compute_dtype"] == "fp32" and "sm61" in d["compute_reason"]
    d = ask("--task", "lora", "--quant", "bf16", "--gpu", "RTX 3090")
    assert d["compute_reason"].startswith("bf16: RTX 3090")  # what the device chose anyway
    d = ask("--task", "inference")  # this CPU answers in fp32; QLoRA's 4-bit layers are no concern
    assert "QLoRA" not in d["time"]["source"]
