"""The llama.cpp backend: a GGUF through llama-cpp-python's low-level API.

llama.cpp removed its own beam search, so the search loops of `toolkit.decoding` drive it here:
each row (beam) is a llama.cpp *sequence* in one unified KV cache. `fork` and `reorder` copy
sequences with `llama_memory_seq_cp`, which in a unified cache only relabels cells (no tensor
copy), and one `llama_decode` call runs all rows' new tokens as one batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from toolkit.decoding.backends import HeldRows

MAX_ROWS = 16  # the widest beam search DecodingConfig allows


class LlamaCppBackend:
    """Next-token logits from a GGUF model. Call `close()` (or use `with`): llama-cpp-python's
    destructors misbehave at interpreter exit otherwise."""

    name = "llama.cpp"

    def __init__(self, gguf_path: str, n_ctx: int = 2048, n_threads: int | None = None, n_batch: int = 512):
        import llama_cpp
        from llama_cpp import _internals

        from toolkit.core.errors import UserError
        from toolkit.decoding.backends import check_n_ctx
        from toolkit.estimate.gguf_header import read_header

        check_n_ctx(n_ctx)
        # estimate's reader: a foreign or cut-off file is "no GGUF magic" / "truncated GGUF header"
        # here as there, where llama.cpp says only "Failed to load model from file".
        header = read_header(gguf_path)
        size = Path(gguf_path).stat().st_size
        if size < header.tensor_bytes:
            raise UserError(f"{gguf_path}: truncated GGUF (its tensors take {header.tensor_bytes} bytes, "
                            f"the file has {size})")
        self._lib = llama_cpp
        self.llm = None
        self.held = HeldRows()  # what the rows' KV holds, for the next prefill to keep
        # The Llama object gives us the model, tokenizer and metadata; its own context stays
        # minimal because decoding runs in the multi-sequence context built below.
        from toolkit.core import signals
        from toolkit.core.hardware import llama_threads

        # Without it llama-cpp-python decodes on half the logical CPUs: one of a 2-core VM's two.
        threads = n_threads or llama_threads()
        try:
            with signals.held():  # loading logs through a Python callback, where a Ctrl-C would be dropped
                self.llm = llama_cpp.Llama(model_path=gguf_path, n_ctx=64, n_batch=64, n_threads=threads,
                                           n_threads_batch=threads, verbose=False)
        except ValueError:  # the header read fine: an architecture or tensor type this llama.cpp lacks
            raise UserError(f"{gguf_path}: llama.cpp cannot load this GGUF (an architecture or tensor type "
                            "this llama-cpp-python does not support?)") from None
        if n_ctx == 0:
            n_ctx = self.llm._model.n_ctx_train()  # llama.cpp's meaning of 0
        try:
            # Start from the Llama object's own settings (threads, flash attention off, ...) so
            # our numbers match its create_completion on the same file.
            base = self.llm.context_params
            self._params = type(base).from_buffer_copy(base)
            self._params.n_batch = self._params.n_ubatch = n_batch
            self._params.n_seq_max = 2 * MAX_ROWS  # rows plus room to copy them during reorder
            self._params.kv_unified = True
            self.ctx, self.kv_cells = None, 0
            self._new_context(n_ctx)
            self.batch = _internals.LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1, verbose=False)
        except Exception:
            self.close()
            raise
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.n_vocab = self.llm.n_vocab()
        self.eos_ids = _end_of_generation_ids(self.llm)
        self.rows: list[int] = [0]  # llama.cpp sequence id of each row
        self.n_past = 0
        self._formatter = None

    # --- text -------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """Render `messages` with the chat template embedded in the GGUF, then tokenize."""
        if self._formatter is None:
            from toolkit.decoding.backends import gguf_chat_formatter

            self._formatter = gguf_chat_formatter(self.llm)
        prompt = self._formatter(messages=messages).prompt
        return self.encode(prompt)

    def decode(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids, special=False).decode("utf-8", errors="replace")

    # --- logits -----------------------------------------------------------------------------
    def _decode(self, tokens: list[int], positions: list[int], seqs: list[int], want: list[bool]) -> None:
        b = self.batch.batch
        b.n_tokens = len(tokens)
        for i, (t, p, s, w) in enumerate(zip(tokens, positions, seqs, want)):
            b.token[i] = t
            b.pos[i] = p
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = s
            b.logits[i] = w
        rc = self._lib.llama_decode(self.ctx.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with status {rc} (context full?)")

    def _new_context(self, cells: int) -> None:
        from llama_cpp import _internals

        if self.ctx is not None:
            self.ctx.close()
            self.ctx = None
        self._params.n_ctx = cells
        self.held.take()
        self.ctx = _internals.LlamaContext(model=self.llm._model, params=self._params, verbose=False)
        self.kv_cells = cells

    def reserve(self, cells: int) -> None:
        """Room for `cells` KV entries across all rows before the next prefill. The unified cache
        holds n_ctx cells shared by every row; a beam search adds one cell per beam and step, so
        it can need more than one row's window: the context is rebuilt larger, only when asked."""
        if cells <= self.kv_cells:
            return
        old = self.kv_cells
        self.rows, self.n_past = [0], 0
        try:
            self._new_context(cells)
        except ValueError:  # llama-cpp-python's "Failed to create llama_context": no memory for it
            from toolkit.core.errors import UserError

            self._new_context(old)
            raise UserError(f"no memory for a KV cache of {cells} tokens (the prompt plus each beam's new "
                            "tokens); lower --num-beams or --max-new-tokens") from None

    def _logits(self, n: int) -> torch.Tensor:
        ptr = self._lib.llama_get_logits(self.ctx.ctx)
        return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(n, self.n_vocab)).copy())

    def prefill(self, ids: list[int]) -> torch.Tensor:
        if len(ids) >= self.n_ctx:
            from toolkit.core.errors import UserError

            raise UserError(f"the prompt has {len(ids)} tokens, the context window holds {self.n_ctx}")
        # Rows other than sequence 0 without beam bookkeeping (a fork or reorder stopped midway) hold
        # nothing known.
        forked = self.held.beams is not None
        row, keep = self.held.row_to_keep(ids) if forked or self.rows == [0] else (0, 0)
        _, beams = self.held.take()
        if keep and beams is not None:
            self._one_row(self.rows[row])
        # A cache that can't drop a tail (a recurrent model's) says no: then it runs the whole prompt.
        if not (keep and self._lib.llama_memory_seq_rm(self.ctx.memory, 0, keep, -1)):
            keep = 0
            self._lib.llama_memory_clear(self.ctx.memory, True)
        self.rows, self.n_past = [0], keep
        for start in range(keep, len(ids), self.n_batch):
            chunk = ids[start:start + self.n_batch]
            last = start + len(chunk) == len(ids)
            self._decode(chunk, list(range(start, start + len(chunk))), [0] * len(chunk),
                         [last and i == len(chunk) - 1 for i in range(len(chunk))])
        self.n_past = len(ids)
        self.held.prefilled(ids)
        return self._logits(1)[0]

    def _one_row(self, seq: int) -> None:
        """Sequence `seq` becomes sequence 0, the only one (the rows of a beam search collapse)."""
        if seq != 0:  # `reorder` may have moved every row off sequence 0, or left another row there
            self._lib.llama_memory_seq_rm(self.ctx.memory, 0, -1, -1)
            self._lib.llama_memory_seq_cp(self.ctx.memory, seq, 0, -1, -1)
        for s in set(self.rows) - {0}:
            self._lib.llama_memory_seq_rm(self.ctx.memory, s, -1, -1)
        self.rows = [0]

    def reset(self) -> None:
        """Forget the cached prompt: the next prefill runs its prompt whole."""
        self.held.take()

    def step(self, tokens: list[int]) -> torch.Tensor:
        if len(tokens) != len(self.rows):
            raise ValueError(f"{len(tokens)} tokens for {len(self.rows)} rows")
        held = self.held.take()
        self._decode(tokens, [self.n_past] * len(tokens), self.rows, [True] * len(tokens))
        self.n_past += 1
        self.held.stepped(held, tokens, one_row=self.rows == [0])
        return self._logits(len(tokens))

    def _free_seq(self, used: set[int]) -> int:
        return next(s for s in range(2 * MAX_ROWS) if s not in used)

    def fork(self, n: int) -> None:
        if n > MAX_ROWS:
            raise ValueError(f"at most {MAX_ROWS} rows")
        # n rows, each the prompt then its own tokens: the next prefill keeps the longest. Nothing is
        # known until every copy is made (a stop may land between two).
        held, one_row = self.held.take(), self.rows == [0]
        used = set(self.rows)
        for _ in range(n - len(self.rows)):
            s = self._free_seq(used)
            self._lib.llama_memory_seq_cp(self.ctx.memory, self.rows[0], s, -1, -1)
            used.add(s)
            self.rows.append(s)
        self.held.forked(held, n, one_row)

    def reorder(self, rows: list[int]) -> None:
        held = self.held.take()
        old = self.rows
        new: list[int | None] = [old[r] if r == i else None for i, r in enumerate(rows)]
        used = set(old)
        for i, r in enumerate(rows):
            if new[i] is None:  # copy before anything is removed: sources may be shared
                s = self._free_seq(used)
                self._lib.llama_memory_seq_cp(self.ctx.memory, old[r], s, -1, -1)
                used.add(s)
                new[i] = s
        for s in set(old) - set(new):
            self._lib.llama_memory_seq_rm(self.ctx.memory, s, -1, -1)
        self.rows = list(new)
        self.held.reordered(held, rows)

    def close(self) -> None:
        ctx, self.ctx = getattr(self, "ctx", None), None
        batch, self.batch = getattr(self, "batch", None), None
        if batch is not None:
            batch.close()
        if ctx is not None:
            ctx.close()
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _end_of_generation_ids(llm) -> frozenset[int]:
    """Every token llama.cpp ends generation on (`llama_vocab_is_eog`, as its create_completion
    checks): EOS and end-of-turn, and for Llama-3 also <|end_of_text|> and <|eom_id|>, which the
    GGUF's single eos id leaves out. ~13 ms for a 49k vocabulary, once per open. The same set an
    export writes as its Modelfile's stops (`end_of_generation_tokens`)."""
    from toolkit.decoding.backends import end_of_generation_tokens

    return frozenset(end_of_generation_tokens(llm))
