"""The toolkit's SFTTrainer: its FLOPs count is transformers' formula with the parameters counted once."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")


def test_floating_point_ops_is_upstreams_with_the_count_kept(tiny):
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer

    from toolkit.finetune.sft_trainer import trainer_class

    model = get_peft_model(copy.deepcopy(tiny[0]), LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer = object.__new__(trainer_class())  # floating_point_ops reads only `model`
    trainer.model = model
    for n in (7, 33):
        inputs = {"input_ids": torch.zeros(1, n, dtype=torch.long), "labels": torch.zeros(1, n, dtype=torch.long)}
        assert trainer.floating_point_ops(inputs) == Trainer.floating_point_ops(trainer, inputs) > 0
    assert trainer._parameter_count == model.num_parameters(exclude_embeddings=True)
    # No main input: upstream's answer (0), not the kept count's formula.
    assert trainer.floating_point_ops({"labels": torch.zeros(1, 3)}) == 0
