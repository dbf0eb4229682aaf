"""Export a fine-tuned run (or `embedded`, or an HF folder) to GGUF for llama.cpp / Ollama / LM Studio.

Merges the LoRA adapter into the unquantized base weights, converts with llama.cpp's official
converter to f16, quantizes each requested type from that one f16 file, and verifies every
file (chat template and EOS in the metadata, logits round trip against the HF model, a chat
turn that stops at the end-of-turn token) before renaming it into place. Beside the GGUFs:
an Ollama Modelfile and a README with the verification numbers.

Default output folder: RUN/gguf/ for a run folder, exports/<name>/ otherwise.
Progress goes to stderr; stdout holds the files written (or, with --json, export.json's content).
Exit status: 0 done, 2 bad input, 1 verification failed (nothing written).
"""

from __future__ import annotations

import contextlib

from toolkit.export.convert import QUANT_TYPES, check_quant

DEFAULT_QUANT = "q4_k_m"


def add_arguments(parser) -> None:
    parser.add_argument("run", metavar="RUN", help="run folder (e.g. runs/latest), `embedded`, or an HF model folder")
    parser.add_argument(
        "--quant", action="extend", nargs="+", default=None, metavar="TYPE",
        help=f"one or more of: {', '.join(QUANT_TYPES)} (default {DEFAULT_QUANT}); commas also separate, "
             "and the flag may be repeated",
    )
    parser.add_argument("--out", default=None, metavar="DIR", help="output folder (default: RUN/gguf or exports/<name>)")
    parser.add_argument("--force", action="store_true", help="overwrite existing files in the output folder")
    parser.add_argument("--json", action="store_true", help="print the export summary (export.json) as one JSON object")


def quant_list(values: list[str] | None) -> list[str]:
    """The --quant values (repeated, space- or comma-separated) as checked quant names."""
    # No argparse default: with action="extend" it would be kept and added to.
    return [check_quant(q) for item in values or [DEFAULT_QUANT] for q in item.split(",") if q.strip()]


def run(args) -> int:
    import json
    import sys

    from toolkit.export.pipeline import ExportFailed, export_model

    quants = quant_list(args.quant)
    try:
        with _exit_on_termination():
            summary = export_model(args.run, quants, out=args.out, force=args.force)
    except ExportFailed as exc:
        print(f"error: {exc} (nothing was written)", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary, default=str))
        return 0
    for q in summary["quants"]:
        print(f"wrote {summary['files'][q]}")
    print(f"done in {summary['seconds']['total']:.1f} s: {', '.join(summary['quants'])} verified; "
          f"Modelfile and README.md beside them in {summary['out_dir']}")
    return 0


@contextlib.contextmanager
def _exit_on_termination():
    """SIGTERM / SIGHUP (`timeout`, `docker stop`, a closed terminal) end the export as Ctrl-C does:
    through the pipeline's cleanup, which a signal's default action skips, leaving ~1 GB of temp
    files (the merged model, the f16 GGUF) in the output folder."""
    import signal

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    # Windows has no SIGHUP: `signal.SIGHUP` itself raises there.
    sigs = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    previous = {sig: signal.signal(sig, stop) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
