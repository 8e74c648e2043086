"""q4lab: a workbench for fused 4-bit (NF4/FP4) dequantize+GEMM kernels at LLM-inference batch sizes."""
__version__ = "0.1.0"

__all__ = ["Q4Weight", "quantize", "dequantize", "gemm_4bit", "IMPLS", "__version__"]
_LAZY = {"Q4Weight": "formats", "quantize": "formats", "dequantize": "formats", "gemm_4bit": "ops", "IMPLS": "ops"}


def __getattr__(name: str):
    # torch loads only when a name that needs it is used: the analysis notebooks never pay for it.
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"q4lab.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'q4lab' has no attribute {name!r}")
