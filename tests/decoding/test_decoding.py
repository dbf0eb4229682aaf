"""toolkit.decoding: transforms against transformers' own logits processors, config
validation, the sampler's distribution, and streaming / stop strings on a tiny real model."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from toolkit.decoding import PRESETS, DecodingConfig, generate, preset, stream
from toolkit.decoding import transforms as T
from toolkit.decoding.search import _stop_prefix_len
from toolkit.core.errors import UserError

VOCAB = 1000


def _logits(seed: int, rows: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=g) * 3


def _same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    kept_ours, kept_theirs = torch.isfinite(ours), torch.isfinite(theirs)
    assert torch.equal(kept_ours, kept_theirs)
    assert kept_ours.sum(-1).min() >= 1
    torch.testing.assert_close(torch.softmax(ours, -1), torch.softmax(theirs, -1), rtol=1e-5, atol=1e-7)


IDS = torch.zeros(4, 3, dtype=torch.long)  # the warpers ignore input ids


@pytest.mark.parametrize("t", [0.3, 0.7, 1.0, 1.8])
def test_temperature_matches_transformers(t):
    x = _logits(1)
    _same(T.temperature(x, t), TemperatureLogitsWarper(t)(IDS, x.clone()))


@pytest.mark.parametrize("k", [1, 5, 50, 999])
def test_top_k_matches_transformers(k):
    x = _logits(2)
    _same(T.top_k(x, k), TopKLogitsWarper(k)(IDS, x.clone()))
    assert int(torch.isfinite(T.top_k(x, k)).sum(-1)[0]) == k


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.99])
def test_top_p_matches_transformers(p):
    for seed in range(5):
        x = _logits(10 + seed)
        _same(T.top_p(x, p), TopPLogitsWarper(p)(IDS, x.clone()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_top_p_keeps_the_same_tied_tokens_as_transformers(dtype):
    """Ties at the cut are common in half-precision logits: the same tokens must stay as in
    transformers, not merely as many."""
    tied = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0], [0.5, 0.5, 0.5, 0.5, 0.5]])
    coarse = (_logits(20) * 2).round() / 2  # many ties at every level
    for x in (tied, coarse):
        x = x.to(dtype)
        ids = torch.zeros(len(x), 1, dtype=torch.long)
        for p in (0.3, 0.5, 0.7, 0.9):
            assert torch.equal(torch.isfinite(T.top_p(x, p)), torch.isfinite(TopPLogitsWarper(p)(ids, x.clone())))


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5, 0.95])
def test_min_p_matches_transformers(p):
    x = _logits(3)
    _same(T.min_p(x, p), MinPLogitsWarper(p)(IDS, x.clone()))


@pytest.mark.parametrize("penalty", [0.8, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    x = _logits(4)
    seen = torch.randint(0, VOCAB, (4, 30), generator=torch.Generator().manual_seed(5))  # with repeats
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(seen, x.clone())
    torch.testing.assert_close(T.repetition_penalty(x, seen, penalty), theirs)
    # one shared history for a single row
    torch.testing.assert_close(T.repetition_penalty(x[0], seen[0], penalty), theirs[0])


def test_full_chain_matches_transformers_order():
    x = _logits(6)
    seen = torch.randint(0, VOCAB, (4, 20), generator=torch.Generator().manual_seed(7))
    theirs = x.clone()
    for proc in (RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.7), TopKLogitsWarper(40),
                 TopPLogitsWarper(0.9), MinPLogitsWarper(0.05)):
        theirs = proc(seen, theirs)
    ours = T.prepare_logits(x, seen, temperature_=0.7, top_k_=40, top_p_=0.9, min_p_=0.05, repetition_penalty_=1.2)
    _same(ours, theirs)


def test_sampler_draws_from_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    g = torch.Generator().manual_seed(0)
    draws = T.sample(probs.expand(20000, -1).contiguous(), g)
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert freq[4] == 0  # a filtered token is never drawn
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
    a = T.sample(probs.expand(50, -1).contiguous(), torch.Generator().manual_seed(9))
    b = T.sample(probs.expand(50, -1).contiguous(), torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


@pytest.mark.parametrize("field, value, words", [
    ("strategy", "nucleus", "strategy"), ("temperature", -0.1, "temperature"), ("top_p", 0.0, "top_p"),
    ("top_p", 1.5, "top_p"), ("top_k", -1, "top_k"), ("top_k", 2.5, "top_k"), ("min_p", 1.2, "min_p"),
    ("num_beams", 0, "num_beams"), ("repetition_penalty", 0, "repetition_penalty"),
    ("max_new_tokens", 0, "max_new_tokens"), ("seed", -3, "seed"), ("stop", ("",), "stop"),
    ("temperature", float("nan"), "temperature"), ("temperature", 1e-40, "temperature"),
    ("seed", 2**64, "seed"),
])
def test_config_rejects_bad_values(field, value, words):
    with pytest.raises(UserError, match=words):
        DecodingConfig(**{field: value})


def test_config_from_dict_and_presets():
    with pytest.raises(UserError, match="unknown decoding setting.*top_q"):
        DecodingConfig.from_dict({"top_q": 0.5})
    for name in PRESETS:
        assert preset(name).strategy in ("greedy", "sample", "beam")
    assert preset("balanced", temperature=0.2, top_k=None).temperature == 0.2
    assert preset("balanced").top_k == PRESETS["balanced"]["top_k"]
    with pytest.raises(UserError, match="unknown preset"):
        preset("wild")
    assert DecodingConfig(strategy="sample", temperature=0).effective_strategy == "greedy"
    assert DecodingConfig(strategy="beam", num_beams=1).effective_strategy == "greedy"
    assert DecodingConfig(seed=2**64 - 1, temperature=1e-6).seed == 2**64 - 1  # the limits themselves are valid
    assert DecodingConfig(stop="END").stop == ("END",)


def test_stop_prefix_holdback():
    assert _stop_prefix_len("hello wor", ("world",)) == 3
    assert _stop_prefix_len("hello", ("world",)) == 0
    assert _stop_prefix_len("ab<|", ("<|x|>", "b<")) == 2


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from toolkit.decoding.backends.hf import HFBackend
    from toolkit.core.loading import load_model

    model, tok = load_model(str(tiny_llama_dir))
    return HFBackend(model, tok)


def test_stream_pieces_join_to_text_and_stop_cuts(tiny):
    prompt = tiny.encode("Once upon a time")
    full = generate(tiny, prompt, DecodingConfig(max_new_tokens=24))
    assert full.new_tokens == 24 and full.finish_reason == "length"
    assert full.text == tiny.decode(full.tokens)
    s = stream(tiny, prompt, DecodingConfig(max_new_tokens=24))
    pieces = list(s)
    assert len(pieces) > 1 and "".join(pieces) == full.text == s.result.text
    # stop on a string that occurs in the middle of the greedy answer: cut exactly before it
    target = full.text[len(full.text) // 2:][:3]
    cut = full.text.index(target)
    s = stream(tiny, prompt, DecodingConfig(max_new_tokens=24, stop=(target,)))
    pieces = list(s)
    assert s.result.finish_reason == "stop"
    assert "".join(pieces) == s.result.text == full.text[:cut]
    assert all(target not in p for p in pieces)


def test_sampling_is_seeded(tiny):
    prompt = tiny.encode("Hello")
    cfg = DecodingConfig(strategy="sample", temperature=1.5, top_k=200, seed=11, max_new_tokens=16)
    a, b = generate(tiny, prompt, cfg), generate(tiny, prompt, cfg)
    c = generate(tiny, prompt, cfg.replace(seed=12))
    assert a.tokens == b.tokens and a.tokens != c.tokens


def _new_tokens(ref: torch.Tensor, prompt: list[int], eos_ids) -> list[int]:
    """generate()'s new tokens up to its first EOS (kept, as ours keeps it); the padding after it dropped."""
    out = ref[0, len(prompt):].tolist()
    end = next((i for i, t in enumerate(out) if t in eos_ids), None)
    return out if end is None else out[:end + 1]


def test_beam_matches_generate_on_tiny_model(tiny):
    prompt = tiny.encode("The quick brown fox")
    for lp in (1.0, 0.0, 2.0):
        ours = generate(tiny, prompt, DecodingConfig(strategy="beam", num_beams=3, max_new_tokens=10, length_penalty=lp))
        ref = tiny.model.generate(torch.tensor([prompt]), do_sample=False, num_beams=3, max_new_tokens=10,
                                  length_penalty=lp)
        assert ours.tokens == _new_tokens(ref, prompt, tiny.eos_ids)


def test_one_beam_with_a_repetition_penalty_equals_generates_greedy(tiny):
    """transformers runs one beam as greedy search, its penalty on the logits: so does ours."""
    prompt = tiny.encode("The quick brown fox")
    ours = generate(tiny, prompt, DecodingConfig(strategy="beam", num_beams=1, max_new_tokens=16,
                                                 repetition_penalty=1.3))
    ref = tiny.model.generate(torch.tensor([prompt]), do_sample=False, num_beams=1, max_new_tokens=16,
                              repetition_penalty=1.3)
    assert ours.tokens == _new_tokens(ref, prompt, tiny.eos_ids)


def test_top_k_shortcut_keeps_tokens_tied_with_the_kth():
    from toolkit.decoding.search import _sample_token

    x = torch.tensor([3.0, 2.0, 2.0, 1.0, 0.0])
    cfg = DecodingConfig(strategy="sample", top_k=2)
    full = torch.softmax(TopKLogitsWarper(2)(IDS[:1], x[None].clone())[0], -1)  # [.576, .212, .212, 0, 0]
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([_sample_token(x, torch.empty(0, dtype=torch.long), cfg, g)
                                          for _ in range(3000)]), minlength=5)
    assert counts[2] > 0 and counts[3] == counts[4] == 0
    torch.testing.assert_close(counts.float() / 3000, full, atol=0.03, rtol=0)


def test_top_k_shortcut_samples_the_same_distribution():
    """_sample_token's top-k shortcut draws from exactly the full chain's distribution."""
    from toolkit.decoding.search import _sample_token

    x = _logits(8, rows=1)[0]
    seen = torch.tensor([1, 2, 3])
    cfg = DecodingConfig(strategy="sample", temperature=0.8, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.3)
    full = T.probs(T.prepare_logits(x, seen, temperature_=0.8, top_k_=20, top_p_=0.8, min_p_=0.05,
                                    repetition_penalty_=1.3))
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([_sample_token(x, seen, cfg, g) for _ in range(4000)]), minlength=VOCAB)
    assert set(counts.nonzero().flatten().tolist()) <= set(full.nonzero().flatten().tolist())
    torch.testing.assert_close(counts.float() / 4000, full, atol=0.03, rtol=0)


def test_with_preset_resets_preset_fields_and_keeps_the_rest():
    """The chat UI's preset menu and the terminal's /preset share this rule."""
    from toolkit.decoding.config import PRESET_FIELDS, with_preset

    mine = DecodingConfig(strategy="beam", num_beams=6, length_penalty=0.5, max_new_tokens=40, seed=3, stop=("##",),
                          top_k=7)
    cfg = with_preset(mine, "precise")
    assert (cfg.num_beams, cfg.length_penalty, cfg.max_new_tokens, cfg.seed, cfg.stop) == (6, 0.5, 40, 3, ("##",))
    assert cfg.strategy == "greedy" and cfg.top_k == DecodingConfig().top_k  # precise is silent on top_k: default
    assert set(PRESET_FIELDS) == {k for p in PRESETS.values() for k in p}
    with pytest.raises(UserError, match="unknown preset"):
        with_preset(mine, "wild")
