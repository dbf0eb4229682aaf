"""The one private TRL function we lean on: fails loudly when upstream renames or removes it."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def test_trl_still_has_the_private_hook():
    """If this fails, TRL renamed `trl.trainer.utils._use_triton`: find its successor and update
    toolkit/finetune/trl_compat.py, or CPU training silently loses its labelled-positions-only LM head."""
    import trl.trainer.utils as trl_utils

    from toolkit.finetune.trl_compat import PRIVATE_HOOK

    assert callable(getattr(trl_utils, PRIVATE_HOOK, None))
    # ... and the fused LM head still asks it, by that module-level name, which patch to take.
    import inspect

    assert f"{PRIVATE_HOOK}(" in inspect.getsource(trl_utils.add_fused_lm_head)
    # Upstream's own answer for the CPU is "no": that is what the wrapper changes.
    assert getattr(trl_utils, PRIVATE_HOOK)(torch.device("cpu")) is False


def test_wrapper_is_scoped_to_its_block():
    import trl.trainer.utils as trl_utils

    from toolkit.finetune.trl_compat import PRIVATE_HOOK, score_labelled_positions_only

    original = getattr(trl_utils, PRIVATE_HOOK)
    with score_labelled_positions_only("cpu"):
        assert getattr(trl_utils, PRIVATE_HOOK)(torch.device("cpu")) is True
    assert getattr(trl_utils, PRIVATE_HOOK) is original
    with pytest.raises(RuntimeError):
        with score_labelled_positions_only("cpu"):
            raise RuntimeError("training failed")
    assert getattr(trl_utils, PRIVATE_HOOK) is original
    with score_labelled_positions_only("cuda:0"):
        assert getattr(trl_utils, PRIVATE_HOOK) is original  # CUDA: TRL decides as it always did


def test_missing_hook_is_announced(monkeypatch):
    import trl.trainer.utils as trl_utils

    from toolkit.finetune.trl_compat import PRIVATE_HOOK, score_labelled_positions_only

    monkeypatch.delattr(trl_utils, PRIVATE_HOOK)
    said = []
    with score_labelled_positions_only("cpu", said.append):
        pass
    assert len(said) == 1 and PRIVATE_HOOK in said[0]
