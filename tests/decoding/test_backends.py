"""Both backends on the REAL embedded model: our loops give exactly what transformers'
`generate` gives, and llama.cpp on an f16 GGUF of the same weights gives the same tokens."""

from __future__ import annotations

import json

import pytest
import torch

from toolkit.decoding import DecodingConfig, generate, stream

MESSAGES = [{"role": "user", "content": "Name three fruits and say one thing about each."}]


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
    adapter, merged into the base: our greedy equals the unmerged PeftModel's generate and differs from
    the bare base."""
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
    assert not hasattr(backend.model, "peft_config")  # merged
    peft_model.eval()
    ref = peft_model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12)[0, len(ids):].tolist()
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


def test_llamacpp_backend_and_verify_run_llama_threads(embedded_f16_gguf, monkeypatch):
    """The decoding backend's context and `verify.open_gguf` run `hardware.llama_threads()` threads for
    decoding and prompt batches, where llama-cpp-python's default decodes on half the logical CPUs."""
    from toolkit.core import hardware
    from toolkit.decoding.backends import load
    from toolkit.export.verify import open_gguf

    monkeypatch.setenv("TOOLKIT_THREADS", "3")
    assert hardware.llama_threads() == 3
    with load(str(embedded_f16_gguf), n_ctx=256) as backend:
        assert (backend._params.n_threads, backend._params.n_threads_batch) == (3, 3)
        assert backend.ctx is not None and generate(backend, backend.encode("Hi"), DecodingConfig(max_new_tokens=2)).new_tokens
    llm = open_gguf(embedded_f16_gguf, n_ctx=256)
    try:
        assert (llm.context_params.n_threads, llm.context_params.n_threads_batch) == (3, 3)
    finally:
        llm.close()
