"""The one float64 reference and the one tolerance table every check of an impl's output uses: the sweep
before it times a point, `q4lab bench` / `q4lab configs` through it, and the GPU tests."""
from __future__ import annotations

import torch

from q4lab import formats, int4_peer, ops

# Largest |out - reference| relative to the largest |reference| that passes, by activation dtype: a few
# roundings of the output and of a dense weight in that dtype; a wrong kernel misses by O(1).
CHECK_TOLERANCE = {"fp32": 1e-3, "fp16": 1e-2, "bf16": 4e-2}
CHECK_FIRST_ROWS = 4          # rows checked: these, plus the last row of every M


def reference(A: torch.Tensor, w: formats.Q4Weight) -> torch.Tensor:
    """The float64 reference of A @ w^T on A's device: the `reference` impl's arithmetic (float64
    accumulation of the dequantized weight), which on the CPU takes seconds for a large weight."""
    return A.double() @ formats.dequantize_float64(w).T


def check_error(out: torch.Tensor, want: torch.Tensor) -> float:
    """Largest |out - reference| relative to the largest |reference| (NaN when `out` holds a NaN): compared
    with CHECK_TOLERANCE[activation dtype]."""
    return float((out.double().cpu() - want.cpu()).abs().max() / want.abs().max().clamp_min(1e-30))


class CheckedRows:
    """Reference outputs of the checked rows, once per shape for every dtype together: the reference
    impl's arithmetic (float64 accumulation of the dequantized weight) but on the sweep's device, since
    the `reference` impl itself runs on the CPU, where a 100M-element weight takes seconds to check and
    an N sweep holds hundreds of them."""

    def __init__(self, ms: tuple[int, ...], dtypes: tuple[str, ...], inputs: dict, weights: dict):
        self.dtypes, self.inputs, self.weights = dtypes, inputs, weights
        self.rows = sorted(set(range(min(CHECK_FIRST_ROWS, max(ms)))) | {m - 1 for m in ms})
        self.cache: dict[str, dict[str, torch.Tensor]] = {}

    def rows_for(self, M: int) -> list[int]:
        return [i for i, row in enumerate(self.rows) if row < M]

    def get(self, shape: str, K: int, dtype: str, impl: str = "simt") -> torch.Tensor:
        """The reference rows of the weight `shape` (K columns) for activations of `dtype`; for the
        torch_int4 peer, of the weight re-quantized to its format, the product it computes."""
        key = (shape, impl == "torch_int4")
        if key not in self.cache:
            dtypes = [d for d in self.dtypes if (K, d) in self.inputs]
            A = torch.cat([self.inputs[K, d][self.rows] for d in dtypes])
            w = self.weights[shape]
            out = (int4_peer.reference(A, w, ops.int4_state(w)) if key[1] else reference(A, w)).cpu()
            self.cache[key] = dict(zip(dtypes, out.split(len(self.rows))))
        return self.cache[key][dtype]
