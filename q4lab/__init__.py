"""q4lab: a workbench for fused 4-bit (NF4/FP4) dequantize+GEMM kernels at LLM-inference batch sizes."""
__version__ = "0.1.0"

from q4lab.formats import Q4Weight, dequantize, quantize  # noqa: E402
from q4lab.ops import IMPLS, gemm_4bit  # noqa: E402

__all__ = ["Q4Weight", "quantize", "dequantize", "gemm_4bit", "IMPLS", "__version__"]
