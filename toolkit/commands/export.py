"""Export a fine-tuned run (or `embedded`, or an HF folder) to GGUF for llama.cpp / Ollama / LM Studio.

Merges the LoRA adapter into the unquantized base weights, converts with llama.cpp's official
converter to f16, quantizes each requested type from that one f16 file, and verifies every
file (chat template and EOS in the metadata, logits round trip against the HF model, a chat
turn that stops at the end-of-turn token) before renaming it into place. Beside the GGUFs:
an Ollama Modelfile and a README with the verification numbers.

Default output folder: RUN/gguf/ for a run folder, exports/<name>/ otherwise.
Exit status: 0 done, 2 bad input, 1 verification failed (nothing written).
"""

from __future__ import annotations

QUANT_CHOICES = ("f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")


def add_arguments(parser) -> None:
    parser.add_argument("run", metavar="RUN", help="run folder (e.g. runs/latest), `embedded`, or an HF model folder")
    parser.add_argument(
        "--quant", nargs="+", default=["q4_k_m"], metavar="TYPE",
        help=f"one or more of: {', '.join(QUANT_CHOICES)} (default q4_k_m); commas also separate",
    )
    parser.add_argument("--out", default=None, metavar="DIR", help="output folder (default: RUN/gguf or exports/<name>)")
    parser.add_argument("--force", action="store_true", help="overwrite existing files in the output folder")


def run(args) -> int:
    import sys

    from toolkit.export import ExportFailed, check_quant, export_model

    quants = [check_quant(q) for item in args.quant for q in item.split(",") if q.strip()]
    try:
        summary = export_model(args.run, quants, out=args.out, force=args.force,
                               progress=lambda msg: print(msg, flush=True))
    except ExportFailed as exc:
        print(f"error: {exc} (nothing was written)", file=sys.stderr)
        return 1
    for q in summary["quants"]:
        print(f"wrote {summary['files'][q]}")
    print(f"done in {summary['seconds']['total']:.1f} s: {', '.join(summary['quants'])} verified; "
          f"Modelfile and README.md beside them in {summary['out_dir']}")
    return 0
