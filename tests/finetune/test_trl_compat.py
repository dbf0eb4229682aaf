"""The private TRL names and Unsloth hook we lean on (fails loudly when upstream renames or removes
them), and the packing plan per engine."""

from __future__ import annotations

import inspect

import pytest

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("name", ["PRIVATE_HOOK", "PRIVATE_KERNEL"])
def test_trl_still_has_the_private_names(name):
    """If this fails, TRL renamed `trl.trainer.utils._use_triton` or `._ChunkedLogProbFunction`: find the
    successor and update toolkit/finetune/trl_compat.py, or CPU training silently loses its lean LM head."""
    import trl.trainer.utils as trl_utils

    from toolkit.finetune import trl_compat

    private = getattr(trl_compat, name)
    assert getattr(trl_utils, private, None) is not None
    # ... and the fused LM head still looks it up, by that module-level name, on every call.
    assert f"{private}(" in inspect.getsource(trl_utils.add_fused_lm_head) or \
        f"{private}.apply(" in inspect.getsource(trl_utils.add_fused_lm_head)


def test_upstream_scores_every_position_on_cpu():
    """Upstream's own answer for the CPU is "no": that is what the wrapper changes."""
    import trl.trainer.utils as trl_utils

    from toolkit.finetune.trl_compat import PRIVATE_HOOK

    assert getattr(trl_utils, PRIVATE_HOOK)(torch.device("cpu")) is False


def test_wrapper_is_scoped_to_its_block():
    import trl.trainer.utils as trl_utils

    from toolkit.finetune.trl_compat import PRIVATE_HOOK, PRIVATE_KERNEL, lean_lm_head_on_cpu

    hook, kernel = getattr(trl_utils, PRIVATE_HOOK), getattr(trl_utils, PRIVATE_KERNEL)
    with lean_lm_head_on_cpu("cpu"):
        assert getattr(trl_utils, PRIVATE_HOOK)(torch.device("cpu")) is True
        assert getattr(trl_utils, PRIVATE_KERNEL) is not kernel
    assert getattr(trl_utils, PRIVATE_HOOK) is hook and getattr(trl_utils, PRIVATE_KERNEL) is kernel
    with pytest.raises(RuntimeError):
        with lean_lm_head_on_cpu("cpu"):
            raise RuntimeError("training failed")
    assert getattr(trl_utils, PRIVATE_HOOK) is hook and getattr(trl_utils, PRIVATE_KERNEL) is kernel
    with lean_lm_head_on_cpu("cuda:0"):  # CUDA: TRL decides as it always did
        assert getattr(trl_utils, PRIVATE_HOOK) is hook and getattr(trl_utils, PRIVATE_KERNEL) is kernel


@pytest.mark.parametrize("name", ["PRIVATE_HOOK", "PRIVATE_KERNEL"])
def test_missing_name_is_announced(monkeypatch, name):
    import trl.trainer.utils as trl_utils

    from toolkit.finetune import trl_compat

    monkeypatch.delattr(trl_utils, getattr(trl_compat, name))
    said = []
    with trl_compat.lean_lm_head_on_cpu("cpu", said.append):
        pass
    assert len(said) == 1 and getattr(trl_compat, name) in said[0]


def test_calls_the_lean_kernel_cannot_take_go_to_trl():
    """Soft-capped logits (Gemma 2) are not handled by cpu_lm_head: TRL's kernel answers, unchanged."""
    import trl.trainer.utils as trl_utils

    from toolkit.finetune.trl_compat import PRIVATE_KERNEL, lean_lm_head_on_cpu

    torch.manual_seed(0)
    h, w, t = torch.randn(6, 8), torch.randn(40, 8), torch.randint(0, 40, (6,))
    args = (h, w, None, t, 1.0, 16, 30.0, 1.0, ("log_probs", "entropy"))
    want = getattr(trl_utils, PRIVATE_KERNEL).apply(*args)
    with lean_lm_head_on_cpu("cpu"):
        got = getattr(trl_utils, PRIVATE_KERNEL).apply(*args)
    for a, b in zip(want, got):
        assert (a is None and b is None) or torch.equal(a, b)


def test_packing_plan_per_engine():
    from toolkit.finetune.trl_compat import packing_plan

    assert packing_plan(False, "unsloth").packing is False
    plain = packing_plan(True, "transformers+peft+bitsandbytes")
    assert plain.packing and plain.hook is None and "position_ids" in plain.mode
    # Unsloth's attention needs its packed-sequence metadata: with its hook packing stays on ...
    hook = lambda model, trainer: None  # noqa: E731
    on = packing_plan(True, "unsloth", unsloth_hook=hook)
    assert on.packing and on.hook is hook and "packed_seq_lengths" in on.mode
    # ... without it (an Unsloth that has none; none installed here) batches are padded, said why.
    off = packing_plan(True, "unsloth")
    assert not off.packing and off.mode == "padded" and "enable_sample_packing" in off.why


def test_unsloth_still_has_its_packing_hook():
    """Fails when Unsloth renames or drops the hook the Unsloth path relies on (runs where Unsloth is installed)."""
    import importlib.util

    if importlib.util.find_spec("unsloth") is None:
        pytest.skip("unsloth is not installed (CUDA machines only)")
    from toolkit.finetune.trl_compat import unsloth_packing_hook

    assert callable(unsloth_packing_hook())
