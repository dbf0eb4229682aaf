"""Published compute and memory rates of common GPUs, for the planner's time model, and the compute
capability of every GPU `--gpu` knows, from which `toolkit.core.capability` decides the dtype.

`tflops` is the dense (non-sparse) 16-bit rate with fp32 accumulation (what PyTorch's bf16/fp16
matmuls use: tensor cores from Volta on, the CUDA cores' fp16 rate before); `fp32_tflops` the
CUDA cores' fp32 rate (PyTorch's fp32 matmuls, TF32 off as it is by default); `bandwidth_gbs`
the memory bandwidth in GB/s (10^9). Names are `toolkit.estimate.budget.GPUS` keys, so `--gpu`
parsing is the budget's (`gpu_bytes`).
Sources (vendor datasheets / architecture whitepapers; fp32 rates from the same sheets):
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
- fp32: T4 8.1, RTX 3060 12.7, RTX 3090 35.6, RTX 4060 15.1, RTX 4070 29.1, RTX 4090 82.6, A10 31.2,
  L4 30.3, A100 19.5, H100 SXM 67 TFLOPS (the same datasheets and whitepapers).
- GTX 1060 6GB, 1070, 1080, 1080 Ti (Pascal GP104/GP102/GP106, sm61): GeForce GTX 10 series
  specifications, fp32 = 2 x CUDA cores x boost clock: 4.4 / 6.5 / 8.9 / 11.3 TFLOPS; 192 / 256 /
  320 / 484 GB/s. Their fp16 runs at 1/64 of that (Pascal whitepaper), so they train in fp32.
- GTX 1660 6GB (TU116, sm75, no tensor cores): 5.0 TFLOPS fp32, fp16 at twice that; 192 GB/s.
- P100 16GB (PCIe, sm60): NVIDIA Tesla P100 datasheet: 18.7 TFLOPS fp16, 9.3 fp32, 732 GB/s.
- V100 16GB / 32GB (SXM2, sm70): NVIDIA V100 datasheet: 125 TFLOPS tensor, 15.7 fp32, 900 GB/s.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPUSpec:
    name: str
    tflops: float  # dense 16-bit TFLOPS, fp32 accumulate (tensor cores where the GPU has them)
    bandwidth_gbs: float
    fp32_tflops: float

    @property
    def flops(self) -> float:
        return self.tflops * 1e12

    def flops_in(self, dtype: str) -> float:
        """Matmul FLOP/s computing in `dtype` (a torch dtype name)."""
        return (self.fp32_tflops if dtype == "float32" else self.tflops) * 1e12

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self.bandwidth_gbs * 1e9


SPECS: dict[str, GPUSpec] = {s.name: s for s in (
    GPUSpec("GTX 1060 6GB", 4.4 / 64, 192.0, 4.4),
    GPUSpec("GTX 1070 8GB", 6.5 / 64, 256.0, 6.5),
    GPUSpec("GTX 1080 8GB", 8.9 / 64, 320.0, 8.9),
    GPUSpec("GTX 1080 Ti 11GB", 11.3 / 64, 484.0, 11.3),
    GPUSpec("GTX 1660 6GB", 10.1, 192.0, 5.0),
    GPUSpec("P100 16GB", 18.7, 732.0, 9.3),
    GPUSpec("V100 16GB", 125.0, 900.0, 15.7),
    GPUSpec("V100 32GB", 125.0, 900.0, 15.7),
    GPUSpec("T4 16GB", 65.0, 320.0, 8.1),
    GPUSpec("RTX 3060 12GB", 25.6, 360.0, 12.7),
    GPUSpec("RTX 3090 24GB", 71.0, 936.0, 35.6),
    GPUSpec("RTX 4060 8GB", 30.2, 272.0, 15.1),
    GPUSpec("RTX 4070 12GB", 58.3, 504.0, 29.1),
    GPUSpec("RTX 4090 24GB", 165.2, 1008.0, 82.6),
    GPUSpec("A10G 24GB", 125.0, 600.0, 31.2),
    GPUSpec("L4 24GB", 121.0, 300.0, 30.3),
    GPUSpec("A100 40GB", 312.0, 1555.0, 19.5),
    GPUSpec("A100 80GB", 312.0, 2039.0, 19.5),
    GPUSpec("H100 80GB", 989.0, 3350.0, 67.0),
)}

# Compute capability of every GPU in the budget table (NVIDIA's CUDA GPUs list): what
# `capability.cuda_record` needs to decide the dtype the toolkit computes in there.
_ARCH = {
    "GTX 10": (6, 1), "P100": (6, 0), "V100": (7, 0), "GTX 16": (7, 5), "RTX 20": (7, 5), "T4": (7, 5),
    "RTX 30": (8, 6), "RTX A": (8, 6), "A10G": (8, 6), "RTX 40": (8, 9), "L4": (8, 9), "RTX 50": (12, 0),
    "A100": (8, 0), "H100": (9, 0),
}


def compute_capability(name: str) -> tuple[int, int]:
    """The compute capability of `name`, a `toolkit.estimate.budget.GPUS` key."""
    for prefix, cc in _ARCH.items():
        if name.startswith(prefix):
            return cc
    raise KeyError(f"no compute capability recorded for {name!r}")


def capability(name: str):
    """The `toolkit.core.capability.Capability` record of the GPU `name` as `--gpu` accepts it."""
    from toolkit.core.capability import cuda_record
    from toolkit.estimate.budget import gpu_bytes

    canonical, _ = gpu_bytes(name)
    return cuda_record(canonical, compute_capability(canonical))


def spec(name: str) -> GPUSpec | None:
    """Rates of the GPU `name` as `--gpu` accepts it (the budget table's parsing); None when the
    GPU's memory is known but its rates are not in SPECS. Unknown names raise UserError."""
    from toolkit.estimate.budget import gpu_bytes

    canonical, _ = gpu_bytes(name)
    return SPECS.get(canonical)
