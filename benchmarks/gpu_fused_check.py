"""Fused rows of the GPU check: model-steps/s of the naive loop vs train_many at large K on CUDA.

    python benchmarks/gpu_fused_check.py        # exits 0 with a note where there is no CUDA device

Same arms as ``benchmarks/fused.py --part steps`` (the naive DataLoader loop is the baseline),
timed in wall-clock seconds with the device synchronised. Goal from issue 8: >= 1000x vs the
naive loop on an H100 at large K.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu_fused_check: no CUDA device here; nothing measured (run it where a GPU is lent)")
        return 0
    from fused import cars, steps_per_second  # benchmarks/fused.py

    device = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device)}")
    for row in steps_per_second(cars(), device, [64, 1024, 4096, 16384], epochs=5, n_sequential=2):
        vs = f"  {row['vs_train']:7.1f}x vs train()" if "vs_train" in row else ""
        print(f"  {row['arm']:<36} K={row['K']:<6} {row['steps_s']:>12.0f} steps/s  {row['ratio']:8.1f}x{vs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
