"""Both backends on the REAL embedded model: our loops give exactly what transformers'
`generate` gives, and llama.cpp on an f16 GGUF of the same weights gives the same tokens."""

from __future__ import annotations

import json

import pytest
import torch

from toolkit.decoding import DecodingConfig, generate, stream

MESSAGES = [{"role": "user", "content": "Name three fruits and say one thing about each."}]


@pytest.fixture(scope="module")
def hf(embedded_dir):
    from toolkit.decoding.backends.hf import HFBackend

    backend = HFBackend.from_spec("embedded", device="cpu")
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def gguf(embedded_f16_gguf):
    from toolkit.decoding.backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(str(embedded_f16_gguf), n_ctx=1024)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def hf_greedy(hf):
    ids = hf.chat_ids(MESSAGES)
    return ids, generate(hf, ids, DecodingConfig(max_new_tokens=24))


@pytest.mark.slow
def test_hf_greedy_equals_generate(hf, hf_greedy):
    ids, ours = hf_greedy
    ref = hf.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24)[0, len(ids):].tolist()
    assert ours.tokens == ref
    assert ours.new_tokens == 24 and ours.finish_reason == "length"
    assert ours.text == hf.tokenizer.decode(ref, skip_special_tokens=True)


@pytest.mark.slow
def test_hf_pre_packed_linears_decode_the_same_tokens(hf, hf_greedy):
    # from_spec packs where this CPU's calibration says it pays; here both ways, whatever it said.
    from toolkit.core import packed_linear
    from toolkit.decoding.backends.hf import HFBackend

    assert hf.matmuls.startswith("matmuls: ")
    ids, packed_or_not = hf_greedy
    plain = HFBackend(hf.model, hf.tokenizer)
    hf.close()  # the module's backend: unpacks; reopened packed below
    assert not any(hasattr(m, packed_linear.PACK) for m in hf.model.modules())
    assert generate(plain, ids, DecodingConfig(max_new_tokens=24)).tokens == packed_or_not.tokens
    with packed_linear.packed_linears(hf.model, torch.float32) as n:
        if packed_linear.available():
            assert n == sum(type(m).__name__ == "PackedLinear" for m in hf.model.modules()) > 0
        assert generate(plain, ids, DecodingConfig(max_new_tokens=24)).tokens == packed_or_not.tokens
    hf.pack("float32")  # as from_spec left it (packed or not, by the calibration)


@pytest.fixture(scope="module")
def beam_ref(hf):
    """transformers' own beam search (num_beams=4) on the embedded model."""
    ids = hf.chat_ids([{"role": "user", "content": "Write one sentence about the moon."}])
    ref = hf.model.generate(torch.tensor([ids]), do_sample=False, num_beams=4, max_new_tokens=10)[0, len(ids):].tolist()
    # up to its first end-of-turn, kept (as ours keeps it); the padding after it dropped
    end = next((i for i, t in enumerate(ref) if t in hf.eos_ids), None)
    return ids, ref if end is None else ref[:end + 1]


@pytest.mark.slow
def test_hf_beam4_equals_generate(hf, beam_ref):
    ids, ref = beam_ref
    ours = generate(hf, ids, DecodingConfig(strategy="beam", num_beams=4, max_new_tokens=10))
    assert ours.tokens == ref
    # beam search really searched: its answer is not the greedy one here
    assert ours.tokens != generate(hf, ids, DecodingConfig(max_new_tokens=10)).tokens


@pytest.mark.slow
def test_hf_seeded_sampling_reproducible(hf):
    ids = hf.chat_ids([{"role": "user", "content": "Tell me a story."}])
    cfg = DecodingConfig(strategy="sample", temperature=1.2, top_p=0.95, seed=5, max_new_tokens=8)
    a, b = generate(hf, ids, cfg), generate(hf, ids, cfg)
    assert a.tokens == b.tokens
    others = {tuple(generate(hf, ids, cfg.replace(seed=s)).tokens) for s in (6, 7)}
    assert others != {tuple(a.tokens)}


@pytest.mark.slow
def test_llamacpp_greedy_equals_hf_on_f16_gguf(hf, gguf, hf_greedy):
    ids, ref = hf_greedy
    assert gguf.chat_ids(MESSAGES) == ids  # the GGUF's embedded template renders the same prompt
    ours = generate(gguf, ids, DecodingConfig(max_new_tokens=24))
    assert ours.tokens == ref.tokens
    assert ours.text == ref.text


@pytest.mark.slow
def test_llamacpp_beams_get_kv_room_past_one_rows_window(embedded_f16_gguf):
    """llama.cpp's unified KV cache holds n_ctx cells for all rows: 8 beams x 200 tokens need ~6x a
    256-token window, and ran out of slots mid-search ("failed to find a memory slot"). The backend
    now grows its cache for the search."""
    from toolkit.decoding.backends.llamacpp import LlamaCppBackend

    with LlamaCppBackend(str(embedded_f16_gguf), n_ctx=256) as small:
        ids = small.encode("Once upon a time, in a land far away, there lived a")
        out = generate(small, ids, DecodingConfig(strategy="beam", num_beams=8, max_new_tokens=200, length_penalty=2.0))
        assert out.new_tokens == 200 and small.kv_cells >= len(ids) + 8 * 200
        # the window one row sees is unchanged: a prompt must still fit n_ctx
        assert small.n_ctx == 256 and generate(small, ids, DecodingConfig(max_new_tokens=4)).new_tokens == 4


@pytest.mark.slow
def test_llamacpp_beam_and_sampling(gguf, beam_ref):
    ids, ref = beam_ref
    beam = generate(gguf, ids, DecodingConfig(strategy="beam", num_beams=4, max_new_tokens=10))
    assert beam.tokens == ref
    cfg = DecodingConfig(strategy="sample", temperature=1.0, top_k=40, seed=1, max_new_tokens=16)
    assert generate(gguf, ids, cfg).tokens == generate(gguf, ids, cfg).tokens


@pytest.mark.slow
def test_llamacpp_streaming_and_stop_strings(gguf):
    ids = gguf.chat_ids([{"role": "user", "content": "Count from 1 to 10, separated by commas."}])
    full = generate(gguf, ids, DecodingConfig(max_new_tokens=40))
    s = stream(gguf, ids, DecodingConfig(max_new_tokens=40))
    pieces = []
    for piece in s:
        pieces.append(piece)
    assert len(pieces) >= 5 and "".join(pieces) == full.text
    stop = "5"
    assert stop in full.text
    s = stream(gguf, ids, DecodingConfig(max_new_tokens=40, stop=(stop,)))
    text = "".join(s)
    assert s.result.finish_reason == "stop" and text == full.text[: full.text.index(stop)]
    assert s.result.new_tokens < full.new_tokens


@pytest.mark.slow
def test_llamacpp_greedy_equals_create_completion():
    """On the shipped Q4_1 GGUF our loop and llama-cpp-python's own greedy completion agree."""
    import llama_cpp

    from toolkit.decoding.backends.llamacpp import LlamaCppBackend
    from toolkit.core.models import embedded_gguf_path

    path = str(embedded_gguf_path())
    with LlamaCppBackend(path, n_ctx=512) as backend:
        ids = backend.chat_ids([{"role": "user", "content": "What is the capital of France?"}])
        ours = generate(backend, ids, DecodingConfig(max_new_tokens=20))
    llm = llama_cpp.Llama(path, n_ctx=512, verbose=False)
    try:
        ref = llm.create_completion(ids, max_tokens=20, temperature=0.0, top_k=1, repeat_penalty=1.0)
    finally:
        llm.close()
    assert ours.text == ref["choices"][0]["text"]
    assert ours.new_tokens == ref["usage"]["completion_tokens"]


def test_run_folder_backend_applies_lora(tiny_llama_dir, tmp_path):
    """A run folder (base + LoRA adapter, as toolkit.finetune.trainer writes it) decodes through the
    adapter: our greedy equals the PeftModel's generate and differs from the bare base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit.decoding.backends import load

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    run = tmp_path / "run"
    peft_model.save_pretrained(run / "adapter")
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(run / "adapter")
    (run / "run.json").write_text(json.dumps({"recipe": "t", "base_model": str(tiny_llama_dir),
                                              "base_source": str(tiny_llama_dir), "method": "lora"}))
    backend = load(str(run))
    bare = load(str(tiny_llama_dir))
    ids = backend.encode("Hello there")
    ours = generate(backend, ids, DecodingConfig(max_new_tokens=12))
    ref = backend.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12)[0, len(ids):].tolist()
    assert ours.tokens == ref
    assert generate(bare, ids, DecodingConfig(max_new_tokens=12)).tokens != ours.tokens


@pytest.mark.slow
def test_generate_command_json_and_errors(embedded_f16_gguf, capsys):
    from toolkit.cli import main

    rc = main(["generate", "--model", str(embedded_f16_gguf), "--prompt", "What is the capital of France?",
               "--max-new-tokens", "12", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and "Paris" in out["text"]
    assert out["new_tokens"] == len(out["tokens"]) >= 1 and out["tokens_per_s"] > 0
    assert out["backend"] == "llama.cpp" and out["config"]["strategy"] == "greedy"
    assert main(["generate", "--prompt", "hi", "--top-p", "1.5"]) == 2
    assert "error: top_p must be in (0, 1]" in capsys.readouterr().err


@pytest.mark.slow
def test_terminal_chat_session(embedded_f16_gguf, capsys, monkeypatch):
    import io

    from toolkit.cli import main

    script = "What is the capital of France?\n/set temperature=-1\n/set max_new_tokens=8\n/retry\n/quit\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    assert main(["chat", "--model", str(embedded_f16_gguf), "--max-new-tokens", "16"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("Paris") == 2  # the answer, then the regenerated one
    assert "error: temperature must be 0 (greedy) or at least" in captured.err
    assert "(max_new_tokens = 8)" in captured.err and "[8 tokens" in captured.err


def test_hf_backend_steps_inside_the_devices_sdpa_choice(tiny_llama_dir, monkeypatch):
    """Each prefill and step attends within `sdpa_backends`' choice for the backend's device (on
    CUDA: no cuDNN kernel, which would plan anew for every KV length). The CPU is made to answer
    CUDA's choice; the tokens are those of torch's own choice."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit.core import sdpa_backends
    from toolkit.decoding.backends.hf import HFBackend

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_llama_dir), AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = HFBackend(model, tok).chat_ids(MESSAGES)
    want = generate(HFBackend(model, tok), ids, DecodingConfig(max_new_tokens=6)).tokens
    monkeypatch.setattr(sdpa_backends, "for_device", lambda device, engine="": sdpa_backends.CUDA_SDPA_BACKENDS)
    seen = []
    hook = model.model.layers[0].self_attn.register_forward_hook(
        lambda *a: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    try:
        got = generate(HFBackend(model, tok), ids, DecodingConfig(max_new_tokens=6)).tokens
    finally:
        hook.remove()
    assert len(seen) >= 6 and not any(seen) and got == want


# ---------------------------------------------------------------- bad model files and --n-ctx


def _cut(src, dst, n: int):
    with open(src, "rb") as f:
        dst.write_bytes(f.read(n))
    return dst


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_gguf_that_is_no_gguf_is_one_line(tmp_path, capsys):
    """estimate's reader, not llama.cpp's "Failed to load model from file" traceback."""
    from toolkit.cli import main

    fake = tmp_path / "fake.gguf"
    fake.write_text("hello, not a model\n")
    assert main(["generate", "-m", str(fake), "-p", "hi"]) == 2
    assert _one_error_line(capsys) == f"error: {fake}: not a GGUF file (no GGUF magic)"
    assert main(["chat", "-m", str(fake)]) == 2
    assert "no GGUF magic" in _one_error_line(capsys)


@pytest.mark.slow
def test_cut_gguf_is_one_line(embedded_f16_gguf, tmp_path):
    from toolkit.core.errors import UserError
    from toolkit.decoding.backends import load
    from toolkit.estimate.gguf_header import read_header

    header_cut = _cut(embedded_f16_gguf, tmp_path / "head.gguf", 1 << 20)  # inside the vocabulary
    with pytest.raises(UserError, match=f"^{header_cut}: truncated GGUF header$"):
        load(str(header_cut))
    size = embedded_f16_gguf.stat().st_size
    header_and_a_little = size - read_header(embedded_f16_gguf).tensor_bytes + 4096
    data_cut = _cut(embedded_f16_gguf, tmp_path / "data.gguf", header_and_a_little)
    with pytest.raises(UserError, match=f"^{data_cut}: truncated GGUF \\(its tensors take"):
        load(str(data_cut))


@pytest.mark.parametrize("spec", ["embedded", "model.gguf"])
def test_negative_n_ctx_is_refused_before_loading(spec, tmp_path, capsys, monkeypatch):
    from toolkit.cli import main
    from toolkit.core import models

    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.gguf").write_text("never read")
    monkeypatch.setattr(models, "resolve", lambda s: pytest.fail("the model was looked at"))
    for cmd in (["generate", "-p", "hi"], ["chat"], ["chat", "--ui"]):
        assert main([*cmd, "-m", spec, "--n-ctx", "-5"]) == 2
        assert _one_error_line(capsys) == "error: --n-ctx -5: must be a whole number >= 0 (0 = the model's own " \
                                          "context window)"


def test_n_ctx_0_is_the_models_own_window_for_hf(tiny_llama_dir):
    from toolkit.decoding.backends import load

    # the config's max_position_embeddings
    assert load(str(tiny_llama_dir), n_ctx=0).n_ctx == 2048 == load(str(tiny_llama_dir)).n_ctx
    assert load(str(tiny_llama_dir), n_ctx=100).n_ctx == 100


@pytest.mark.slow
def test_n_ctx_0_is_the_models_own_window_for_gguf(embedded_f16_gguf):
    """llama.cpp's meaning of 0 (the GGUF's context_length), no longer a silent 2048."""
    from toolkit.decoding.backends import load

    with load(str(embedded_f16_gguf), n_ctx=0) as own, load(str(embedded_f16_gguf)) as default:
        assert (own.n_ctx, own.kv_cells, default.n_ctx) == (8192, 8192, 2048)
        ids = own.encode("Hello")
        assert generate(own, ids, DecodingConfig(max_new_tokens=3)).new_tokens == 3


def test_unknown_hub_id_offline_is_one_line(capsys, monkeypatch):
    """As finetune says it for a base it can't have, not transformers' OSError traceback."""
    from huggingface_hub import constants

    from toolkit.cli import main

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["generate", "-m", "nosuch-org/nosuch-model", "-p", "hi"]) == 2
    assert _one_error_line(capsys) == ("error: nosuch-org/nosuch-model: offline (HF_HUB_OFFLINE is set) and not in "
                                       "the local HF cache")


@pytest.mark.slow
def test_llamacpp_kv_room_it_cannot_get_is_one_line(embedded_f16_gguf, monkeypatch):
    """No memory for the beams' cache: said as such, and the backend keeps its window and still decodes."""
    from llama_cpp import _internals

    from toolkit.core.errors import UserError
    from toolkit.decoding.backends.llamacpp import LlamaCppBackend

    real = _internals.LlamaContext

    def small_only(*, model, params, verbose):
        if params.n_ctx > 1000:
            raise ValueError("Failed to create llama_context")
        return real(model=model, params=params, verbose=verbose)

    with LlamaCppBackend(str(embedded_f16_gguf), n_ctx=256) as small:
        ids = small.encode("Once upon a time")
        monkeypatch.setattr(_internals, "LlamaContext", small_only)
        with pytest.raises(UserError, match="^no memory for a KV cache of .* lower --num-beams or --max-new-tokens$"):
            generate(small, ids, DecodingConfig(strategy="beam", num_beams=8, max_new_tokens=200))
        assert small.kv_cells == 256 and generate(small, ids, DecodingConfig(max_new_tokens=4)).new_tokens == 4


@pytest.mark.slow
@pytest.mark.parametrize("which", ["hf", "gguf"])
def test_next_turn_runs_only_past_the_prefix_it_kept(which, request):
    """A chat's next turn repeats the conversation so far: the backend keeps the KV of the prefix its
    last call left and runs only the rest. The logits and greedy answer equal a prefill from scratch."""
    backend = request.getfixturevalue(which)
    cfg = DecodingConfig(max_new_tokens=12)
    turn1 = backend.chat_ids(MESSAGES)
    first = generate(backend, turn1, cfg)
    reply = backend.decode(first.tokens)
    turn2 = backend.chat_ids(MESSAGES + [{"role": "assistant", "content": reply},
                                         {"role": "user", "content": "Which is sweetest?"}])
    run = []
    forward = backend._forward if which == "hf" else backend._decode
    spy = (lambda ids: run.append(ids.shape[1]) or forward(ids)) if which == "hf" else \
        (lambda tokens, *a: run.append(len(tokens)) or forward(tokens, *a))
    setattr(backend, "_forward" if which == "hf" else "_decode", spy)
    try:
        kept = backend.prefill(turn2)
        assert sum(run) < len(turn2) - len(turn1)  # the first turn and most of the reply were kept
        answer = generate(backend, turn2, cfg).tokens  # the same prompt again: all but its last token kept
        backend.reset()
        run.clear()
        whole = backend.prefill(turn2)
        assert sum(run) == len(turn2)
        backend.reset()
        fresh = generate(backend, turn2, cfg).tokens
    finally:
        delattr(backend, "_forward" if which == "hf" else "_decode")
    assert torch.allclose(kept, whole, atol=2e-3 if which == "hf" else 5e-2)
    assert answer == fresh


@pytest.mark.slow
def test_a_forward_stopped_midway_keeps_nothing(hf, monkeypatch):
    """Ctrl-C (or the UI's stop) inside a forward leaves some layers a token longer than others: the
    next prefill must not keep any of that cache."""
    ids = hf.chat_ids(MESSAGES)
    hf.prefill(ids)
    layers = hf.model.model.layers
    real = layers[1].forward

    def stop(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(layers[1], "forward", stop)
    with pytest.raises(KeyboardInterrupt):
        hf.step([ids[-1]])
    monkeypatch.setattr(layers[1], "forward", real)
    assert hf.cached == [] and hf.cache is None
    again = hf.prefill(ids)
    hf.reset()
    assert torch.allclose(again, hf.prefill(ids), atol=1e-4)


class _Spy:
    """Counts the tokens each prefill runs through the model, and (the test's own oracle) tracks the
    tokens every row of the cache holds through the backend's public calls: the longest prefix a
    row shares with the next prompt is what that prefill may keep."""

    def __init__(self, backend, which: str):
        self.backend, self.inner = backend, "_forward" if which == "hf" else "_decode"
        self.rows: list[list[int]] = []
        self.prefills: list[tuple[int, int, torch.Tensor]] = []  # (tokens run, tokens it may keep, logits)
        self._run: list[int] = []

    def __enter__(self):
        from toolkit.decoding.backends import reusable_prefix

        b, run = self.backend, self._run
        forward, prefill, fork, reorder, step, reset = b._forward if self.inner == "_forward" else b._decode, \
            b.prefill, b.fork, b.reorder, b.step, b.reset
        if self.inner == "_forward":
            b._forward = lambda ids: run.append(ids.shape[1]) or forward(ids)
        else:
            b._decode = lambda tokens, *a: run.append(len(tokens)) or forward(tokens, *a)

        def spy_prefill(ids):
            may_keep = max((reusable_prefix(r, ids) for r in self.rows), default=0)
            start = len(run)
            logits = prefill(ids)
            self.prefills.append((sum(run[start:]), may_keep, logits))
            self.rows = [list(ids)]
            return logits

        def spy_fork(n):
            fork(n)
            self.rows = [list(self.rows[0]) for _ in range(n)]

        def spy_reorder(rows):
            reorder(rows)
            self.rows = [list(self.rows[r]) for r in rows]

        def spy_step(tokens):
            logits = step(tokens)
            self.rows = [r + [t] for r, t in zip(self.rows, tokens)]
            return logits

        def spy_reset():
            reset()
            self.rows = []

        b.prefill, b.fork, b.reorder, b.step, b.reset = spy_prefill, spy_fork, spy_reorder, spy_step, spy_reset
        return self

    def __exit__(self, *exc):
        for name in (self.inner, "prefill", "fork", "reorder", "step", "reset"):
            delattr(self.backend, name)


MOON = [{"role": "user", "content": "Write one sentence about the moon."}]
BEAMS = DecodingConfig(strategy="beam", num_beams=4, max_new_tokens=12)


def _after_the_beams(backend):
    """Beam search on MOON, then the next turn's prompt (the best answer, a new question) and what a
    prefill of it may keep: at least the beam search's prompt, which every row holds."""
    backend.reset()
    turn1 = backend.chat_ids(MOON)
    reply = backend.decode(generate(backend, turn1, BEAMS).tokens)
    turn2 = backend.chat_ids(MOON + [{"role": "assistant", "content": reply},
                                     {"role": "user", "content": "And one about the sun?"}])
    return turn1, turn2


@pytest.mark.slow
@pytest.mark.parametrize("which", ["hf", "gguf"])
def test_next_turn_after_a_beam_search_keeps_the_prompt(which, request):
    """`--num-beams` in a chat: the turn after a beam search keeps the KV of the longest prefix a beam
    row still holds (the conversation so far, at least) and runs only the rest; the logits and the
    greedy answer equal a prefill from scratch."""
    backend = request.getfixturevalue(which)
    cfg = DecodingConfig(max_new_tokens=12)
    with _Spy(backend, which) as spy:
        turn1, turn2 = _after_the_beams(backend)
        spy.prefills.clear()
        backend.prefill(turn2)
        answer = generate(backend, turn2, cfg).tokens
        backend.reset()
        whole = backend.prefill(turn2)
        backend.reset()
        fresh = generate(backend, turn2, cfg).tokens
    (ran, may_keep, kept), _again, (ran_whole, _, _), _fresh = spy.prefills
    assert may_keep >= len(turn1) and ran_whole == len(turn2)
    assert ran == len(turn2) - may_keep  # the old code ran the whole conversation after a beam search
    assert may_keep > len(turn1) + 5  # here a row also still holds most of the answer: kept as well
    assert torch.allclose(kept, whole, atol=2e-3 if which == "hf" else 5e-2)
    assert answer == fresh


@pytest.mark.slow
@pytest.mark.parametrize("which", ["hf", "gguf"])
def test_beam_search_after_a_beam_search_keeps_the_prompt(which, request):
    """A second beam search on the extended conversation keeps the first one's prompt too, and
    returns what a beam search from scratch returns, token for token."""
    backend = request.getfixturevalue(which)
    cfg = BEAMS.replace(num_beams=3)
    with _Spy(backend, which) as spy:
        turn1, turn2 = _after_the_beams(backend)
        spy.prefills.clear()
        beams = generate(backend, turn2, cfg).tokens
        backend.reset()
        fresh = generate(backend, turn2, cfg).tokens
    (ran, may_keep, kept), (ran_whole, _, whole) = spy.prefills
    assert may_keep >= len(turn1) and ran_whole == len(turn2)
    assert ran == len(turn2) - may_keep  # the old code ran the whole conversation after a beam search
    assert torch.allclose(kept, whole, atol=2e-3 if which == "hf" else 5e-2)
    assert beams == fresh


@pytest.mark.slow
@pytest.mark.parametrize("which", ["hf", "gguf"])
def test_a_beam_step_stopped_midway_keeps_nothing(which, request, monkeypatch):
    """Stopped inside a beam search's step (Ctrl-C, the UI's stop), the rows' KV is not known: the
    next prefill keeps none of it, not even the prompt every row held."""
    backend = request.getfixturevalue(which)
    backend.reset()
    ids = backend.chat_ids(MOON)
    with _Spy(backend, which) as spy:
        backend.prefill(ids)
        backend.fork(3)
        backend.step([ids[-1]] * 3)
        real = backend.model.model.layers[1].forward if which == "hf" else backend._lib.llama_decode

        def stop(*a, **kw):
            if which == "gguf":
                real(*a)  # the decode done, its tokens in the cache, then stopped
            raise KeyboardInterrupt

        if which == "hf":
            monkeypatch.setattr(backend.model.model.layers[1], "forward", stop)  # layer 0 holds a token more
        else:
            monkeypatch.setattr(backend._lib, "llama_decode", stop)
        with pytest.raises(KeyboardInterrupt):
            backend.step([ids[-2]] * 3)
        monkeypatch.undo()
        again = backend.prefill(ids)
        backend.reset()
        whole = backend.prefill(ids)
    (_, _, _), (ran, _, _), (ran_whole, _, _) = spy.prefills
    assert ran == ran_whole == len(ids)
    assert torch.allclose(again, whole, atol=1e-4 if which == "hf" else 5e-2)
