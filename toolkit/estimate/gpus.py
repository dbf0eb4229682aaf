"""Published compute and memory rates of common GPUs, for the planner's time model.

`tflops` is the dense (non-sparse) 16-bit tensor-core rate with fp32 accumulation (what PyTorch's
bf16/fp16 matmuls use); `bandwidth_gbs` the memory bandwidth in GB/s (10^9). Names are
`toolkit.estimate.budget.GPUS` keys, so `--gpu` parsing is the budget's (`gpu_bytes`).
Sources (vendor datasheets / architecture whitepapers):
- T4: NVIDIA T4 datasheet: 65 TFLOPS mixed-precision FP16, 320 GB/s (no bf16).
- RTX 3060 12GB, RTX 3090: NVIDIA Ampere GA102 whitepaper, appendix tables: FP16 tensor with FP32
  accumulate 25.6 / 71 TFLOPS dense (GeForce runs fp32 accumulate at half the fp16-accumulate rate);
  360 / 936 GB/s.
- RTX 4060 8GB, RTX 4070, RTX 4090: NVIDIA Ada Lovelace whitepaper (RTX 4090 165.2 TFLOPS FP16/BF16
  tensor with FP32 accumulate, dense; 4070 / 4060 scale with their shader rates 29.1 / 15.1 TFLOPS
  the same 2x); 272 / 504 / 1008 GB/s.
- A10G: AWS's variant of the A10; NVIDIA A10 datasheet: BF16 tensor 125 TFLOPS dense, 600 GB/s.
- L4: NVIDIA L4 datasheet: FP16/BF16 tensor 242 TFLOPS with sparsity = 121 dense, 300 GB/s.
- A100 40GB / 80GB (SXM): NVIDIA A100 datasheet: BF16 tensor 312 TFLOPS dense, 1555 / 2039 GB/s.
- H100 80GB (SXM): NVIDIA H100 datasheet: BF16 tensor 989 TFLOPS dense (1979 with sparsity),
  3350 GB/s.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPUSpec:
    name: str
    tflops: float  # dense 16-bit tensor TFLOPS, fp32 accumulate
    bandwidth_gbs: float
    bf16: bool = True

    @property
    def flops(self) -> float:
        return self.tflops * 1e12

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self.bandwidth_gbs * 1e9


SPECS: dict[str, GPUSpec] = {s.name: s for s in (
    GPUSpec("T4 16GB", 65.0, 320.0, bf16=False),
    GPUSpec("RTX 3060 12GB", 25.6, 360.0),
    GPUSpec("RTX 3090 24GB", 71.0, 936.0),
    GPUSpec("RTX 4060 8GB", 30.2, 272.0),
    GPUSpec("RTX 4070 12GB", 58.3, 504.0),
    GPUSpec("RTX 4090 24GB", 165.2, 1008.0),
    GPUSpec("A10G 24GB", 125.0, 600.0),
    GPUSpec("L4 24GB", 121.0, 300.0),
    GPUSpec("A100 40GB", 312.0, 1555.0),
    GPUSpec("A100 80GB", 312.0, 2039.0),
    GPUSpec("H100 80GB", 989.0, 3350.0),
)}


def spec(name: str) -> GPUSpec | None:
    """Rates of the GPU `name` as `--gpu` accepts it (the budget table's parsing); None when the
    GPU's memory is known but its rates are not in SPECS. Unknown names raise UserError."""
    from toolkit.estimate.budget import gpu_bytes

    canonical, _ = gpu_bytes(name)
    return SPECS.get(canonical)
