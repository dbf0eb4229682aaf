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
    (["method.name=full"], "cuda", "bfloat16", "fp32"),  # fp32 master weights under autocast
])
def test_quant_follows_method_and_dtype(sets, device, dtype, quant):
    assert plan_inputs(recipe.load(FINANCE, sets, gpu=False), device, dtype).quant == quant


def test_named_targets_pass_through():
    rec = recipe.load(FINANCE, ["lora.target_modules=q_proj,v_proj"], gpu=False)
    assert plan_inputs(rec, "cpu", "float32").targets == ("q_proj", "v_proj")


def test_pick_and_fit_check_agree(monkeypatch):
    """For every machine size, `base_model: auto` picks a model exactly when the fit check would
    let that model train: both estimate the recipe's run and compare it with the same usable memory."""
    from toolkit.core import hardware
    from toolkit.estimate.planner import pick
    from toolkit.finetune.base_model import Unavailable, check_fits

    rec = recipe.load(FINANCE, gpu=False)
    p = plan_inputs(rec, "cpu", "float32")
    for gib in (1, 2, 3, 6, 12):
        machine = hardware.Hardware("cpu", "test box", gib * 2**30, gib * 2**30, "test")
        monkeypatch.setattr(hardware, "detect", lambda use_torch=False, m=machine: m)
        chosen = pick(p.task, machine.available_bytes, p.seq_len, p.batch, p.lora_r, p.device, quants=(p.quant,),
                      grad_ckpt=p.grad_ckpt, targets=p.targets, optimizer=p.optimizer, lora_dropout=p.lora_dropout)
        for cand in chosen.candidates:
            try:
                check_fits(rec, cand.model, "cpu", "float32")
                allowed = True
            except Unavailable:
                allowed = False
            assert allowed == cand.fits, (gib, cand.model)
