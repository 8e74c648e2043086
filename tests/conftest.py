import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip, saying why and what to run, where torch sees no GPU."""
    if torch.cuda.is_available():
        return
    build = "ROCm" if torch.version.hip else "CUDA" if torch.version.cuda else "CPU-only"
    skip = pytest.mark.skip(reason=f"needs a CUDA or ROCm GPU; torch {torch.__version__} ({build}) sees none: "
                                   f"run `.venv/bin/python -m pytest -m gpu` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
