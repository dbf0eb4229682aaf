"""The transformers backend: any causal LM (base, HF folder, run folder = base + LoRA adapter,
merged into an fp32 base's weights) with a `DynamicCache`, so each step runs only the new token through
the model.

Opened from a spec on a CPU, the model's linear layers run with oneDNN pre-packed weights where
the calibration measured that faster (`toolkit.core.packed_linear.for_device`; `matmuls` says
which and why): greedy decoding of the embedded model went from ~21 to ~33 tokens/s on the 2-core
Zen 5 EPYC in fp32 (make bench, "transformers backend" rows). Decoding records no autograd graph, so
each packed layer calls oneDNN directly: through the autograd Function it read 0.96x torch's matmul on
the AVX2-only Zen 3 (the Function's own ~50 us a layer), 1.27x without. A run folder's adapter is merged
into the base when loaded: as a PeftModel it decoded at 13.6 against 23.5 tok/s there."""

from __future__ import annotations

import torch

from toolkit.core import sdpa_backends
from toolkit.decoding.backends import HeldRows


class HFBackend:
    """Next-token logits from a transformers model, rows kept in one batched KV cache."""

    name = "transformers"

    def __init__(self, model, tokenizer, n_ctx: int | None = None):
        from toolkit.decoding.backends import check_n_ctx

        check_n_ctx(n_ctx)
        self.model, self.tokenizer = model, tokenizer
        self.matmuls = "matmuls: the model's own"
        self._packed = None  # the packed_linears block this backend holds open until close()
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else eos)
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        self.n_ctx = min(n_ctx, limit) if n_ctx else limit
        self.device = next(model.parameters()).device
        self._sdpa = sdpa_backends.for_device(self.device.type)
        self.cache = None
        self.held = HeldRows()  # what `cache` holds, for the next prefill to keep

    @classmethod
    def from_spec(cls, spec: str, n_ctx: int | None = None, device: str | None = None) -> "HFBackend":
        from toolkit.core import hardware, primitive_caches
        from toolkit.core.loading import load_model

        primitive_caches.bound()  # before torch computes anything: prompts and batches vary in shape
        dev = device or hardware.device()
        hardware.apply_threads(dev)
        dtype = hardware.dtype_for(dev, "infer")
        # A run folder's adapter merged into its fp32 base: unmerged, each of the 210 adapted layers adds
        # two r-wide products, a scale and an add to every token (10.5-11.9 against 19.0-21.2 tok/s for
        # the finance run on the Zen 3, the same 48 greedy tokens). In fp32 the merge rounds at 2^-24 of
        # a weight; a 16-bit GPU model would round the adapter's small update to its weights' coarser
        # step, and that path is unmeasured, so it keeps the adapter apart.
        model, tok = load_model(spec, device=dev, dtype=dtype, merge=dtype == "float32")
        backend = cls(model, tok, n_ctx)
        if dev == "cpu":
            backend.pack(dtype)
        return backend

    def pack(self, dtype: str) -> str:
        """Run the model's frozen linear layers pre-packed for oneDNN where this CPU's calibration
        says that pays (this backend owns the model: it freezes it); returns the reason."""
        from toolkit.core import packed_linear

        self.model.requires_grad_(False)
        block, self.matmuls = packed_linear.for_device(self.model, "cpu", dtype, "infer")
        block.__enter__()
        self._packed = block
        return self.matmuls

    # --- text -------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of `messages` in the model's chat template, ready for the assistant turn."""
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # --- logits -----------------------------------------------------------------------------
    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Every step's KV length is new: on CUDA, SDPA keeps off cuDNN's kernel, which plans per shape.
        try:
            with sdpa_backends.kept_to(self._sdpa):
                out = self.model(input_ids=ids.to(self.device), past_key_values=self.cache, use_cache=True,
                                 logits_to_keep=1)
        except BaseException:  # stopped mid-forward (Ctrl-C, the UI's stop): some layers hold one more token
            self.reset()
            raise
        self.cache = out.past_key_values
        # The search loop runs on the CPU: one small copy per step (it syncs for the token id anyway).
        return out.logits[:, -1, :].float().cpu()

    def prefill(self, ids: list[int]) -> torch.Tensor:
        from transformers import DynamicCache

        row, keep = self.held.row_to_keep(ids) if self.cache is not None else (0, 0)
        _, beams = self.held.take()
        try:
            if keep and beams is not None:  # back to one row
                self.cache.batch_select_indices(torch.tensor([row], dtype=torch.long, device=self.device))
            drop = self.cache.get_seq_length() - keep if keep else 0
            if drop > 0:
                self.cache.crop(-drop)  # negative: tokens to remove, in transformers 4 and 5 alike
        except (ValueError, RuntimeError):  # a sliding-window layer past its window can't give back what it
            # dropped (transformers 5.x says so with a RuntimeError)
            keep = 0
        if not keep:
            self.cache = DynamicCache(config=self.model.config)
        logits = self._forward(torch.tensor([ids[keep:]], dtype=torch.long))[0]
        self.held.prefilled(ids)
        return logits

    def reset(self) -> None:
        """Forget the cached prompt: the next prefill runs its prompt whole."""
        self.cache = None
        self.held.take()

    def step(self, tokens: list[int]) -> torch.Tensor:
        held = self.held.take()
        logits = self._forward(torch.tensor(tokens, dtype=torch.long)[:, None])
        self.held.stepped(held, tokens, one_row=True)
        return logits

    def fork(self, n: int) -> None:
        # n rows, each the prompt then its own tokens: the next prefill keeps the longest. The layers
        # are repeated one by one (a stop may land between two).
        held = self.held.take()
        self.cache.batch_repeat_interleave(n)
        self.held.forked(held, n)

    def reorder(self, rows: list[int]) -> None:
        held = self.held.take()
        self.cache.reorder_cache(torch.tensor(rows, dtype=torch.long, device=self.device))
        self.held.reordered(held, rows)

    def close(self) -> None:
        self.reset()
        if self._packed is not None:
            block, self._packed = self._packed, None
            block.__exit__(None, None, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
