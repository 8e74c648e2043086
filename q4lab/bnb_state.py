"""A Q4Weight in the state-dict layout of a bitsandbytes `Linear4bit`: the same keys, order, shapes, dtypes
and packed-JSON quant state, so weights quantized by bitsandbytes can be loaded and probed, and ours
loaded by bitsandbytes."""
from __future__ import annotations

import json

import torch

from q4lab.formats import DTYPES, NESTED_BLOCKSIZE, QUANT_TYPES, FormatError, Q4Weight, dtype_name


def to_state_dict(w: Q4Weight, prefix: str = "") -> dict[str, torch.Tensor]:
    """The weight entries a bitsandbytes `Linear4bit` with module prefix `prefix` puts in its state dict.

    Same keys, order, shapes, dtypes and packed-JSON bytes as `QuantState.as_dict(packed=True)`.
    """
    sd = {
        f"{prefix}weight": w.packed.reshape(-1, 1),  # Params4bit keeps the bytes as a column
        f"{prefix}weight.absmax": w.absmax,
        f"{prefix}weight.quant_map": w.code,
    }
    quant_state = {
        "quant_type": w.quant_type,
        "blocksize": w.blocksize,
        "dtype": dtype_name(w.dtype),
        "shape": list(w.shape),
    }
    if w.nested:
        sd[f"{prefix}weight.nested_absmax"] = w.nested_absmax
        sd[f"{prefix}weight.nested_quant_map"] = w.nested_code
        quant_state |= {
            "nested_blocksize": NESTED_BLOCKSIZE,
            "nested_dtype": "float32",
            "nested_offset": w.nested_offset,
        }
    quant_state_bytes = list(json.dumps(quant_state).encode("utf-8"))
    sd[f"{prefix}weight.quant_state.bitsandbytes__{w.quant_type}"] = torch.tensor(
        quant_state_bytes, dtype=torch.uint8
    )
    return sd


def from_state_dict(sd: dict[str, torch.Tensor], prefix: str = "") -> Q4Weight:
    """Read the weight of a bitsandbytes `Linear4bit` at module prefix `prefix` from a state dict.

    Other keys (the bias, other layers) are ignored. Tensors stay on the device they are on.
    """
    weight_key = f"{prefix}weight"
    quant_state_keys = [f"{weight_key}.quant_state.bitsandbytes__{qt}" for qt in QUANT_TYPES]
    present = [key for key in quant_state_keys if key in sd]
    if len(present) != 1:
        found = [key for key in sd if ".quant_state.bitsandbytes__" in key]
        raise FormatError(
            f"state dict needs exactly one of {quant_state_keys}, it has {found or 'no 4-bit quant state'}: "
            "pass the layer's module prefix as `prefix` (e.g. 'model.layers.0.mlp.up_proj.') and a state "
            "dict saved from a quantized bitsandbytes Linear4bit (or by bnb_state.to_state_dict)"
        )
    quant_state = _quant_state(present[0], sd[present[0]])
    _check_keys(present[0], quant_state, ("quant_type", "blocksize", "dtype", "shape"))
    nested = "nested_offset" in quant_state
    if nested:
        _check_keys(present[0], quant_state, ("nested_blocksize", "nested_dtype"))
        if (quant_state["nested_blocksize"], quant_state["nested_dtype"]) != (NESTED_BLOCKSIZE, "float32"):
            raise FormatError(
                f"nested blocksize {quant_state['nested_blocksize']} / dtype {quant_state['nested_dtype']} "
                f"is not bitsandbytes' {NESTED_BLOCKSIZE} / float32: requantize with bitsandbytes' defaults"
            )
    tensor_names = ["absmax", "quant_map"] + (["nested_absmax", "nested_quant_map"] if nested else [])
    required = [weight_key] + [f"{weight_key}.{name}" for name in tensor_names]
    missing = [key for key in required if key not in sd]
    if missing:
        raise FormatError(
            f"state dict is missing {missing} for a "
            f"{'nested ' if nested else ''}{quant_state['quant_type']} weight at prefix {prefix!r}: "
            "pass the full state dict of the layer (all its 'weight.*' entries)"
        )
    if quant_state["dtype"] not in [dtype_name(d) for d in DTYPES]:
        raise FormatError(
            f"weight dtype {quant_state['dtype']!r} is not supported: q4lab handles "
            f"{[dtype_name(d) for d in DTYPES]}"
        )
    shape = quant_state["shape"]
    if not isinstance(shape, list) or len(shape) != 2:
        raise FormatError(f"weight shape {shape} is not 2-D: q4lab handles Linear weights [N, K] only")
    offset = quant_state.get("nested_offset")
    if nested and (isinstance(offset, bool) or not isinstance(offset, (int, float))):
        raise FormatError(f"{present[0]}: nested_offset {offset!r} is not a number")
    if not isinstance(sd[weight_key], torch.Tensor):
        raise FormatError(f"{weight_key} is a {type(sd[weight_key]).__name__}, not a tensor of packed codes")
    # A bitsandbytes quant_storage other than uint8 only reinterprets the same bytes.
    packed = sd[weight_key].contiguous().view(torch.uint8).reshape(-1)
    try:
        w = Q4Weight(
            packed=packed,
            absmax=sd[f"{weight_key}.absmax"],
            code=sd[f"{weight_key}.quant_map"],
            shape=tuple(shape),
            dtype=getattr(torch, quant_state["dtype"]),
            quant_type=quant_state["quant_type"],
            blocksize=quant_state["blocksize"],
            nested_absmax=sd[f"{weight_key}.nested_absmax"] if nested else None,
            nested_offset=quant_state["nested_offset"] if nested else None,
            nested_code=sd[f"{weight_key}.nested_quant_map"] if nested else None,
        )
    except FormatError as err:
        raise FormatError(f"the weight at prefix {prefix!r} (quant state {present[0]}): {err}") from None
    scales = f"{weight_key}.nested_absmax" if nested else f"{weight_key}.absmax"
    bad = ~torch.isfinite(sd[scales]) | (sd[scales] < 0)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise FormatError(f"{scales} has {int(bad.sum())} NaN, infinite or negative value(s), the first at "
                          f"[{first}] ({sd[scales][first].item()}): absmax scales are >= 0; the state dict "
                          f"is damaged, so re-export it from the quantized layer")
    return w


def _quant_state(key: str, packed: torch.Tensor) -> dict:
    """The JSON object bitsandbytes packs into a uint8 tensor, or a FormatError naming `key`."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise FormatError(f"{key} is not a 1-D uint8 tensor of JSON bytes: it is not a bitsandbytes quant state")
    try:
        quant_state = json.loads(bytes(packed.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FormatError(f"{key} does not hold JSON text ({type(err).__name__}: {err}): the quant state is "
                          f"truncated or damaged; re-export the state dict from the quantized layer") from None
    if not isinstance(quant_state, dict):
        raise FormatError(f"{key} holds a JSON {type(quant_state).__name__}, not the quant state's object")
    return quant_state


def save(w: Q4Weight, path, prefix: str = "") -> None:
    """Write `w` with torch.save in bitsandbytes' state-dict layout (loadable by bitsandbytes too)."""
    torch.save(to_state_dict(w, prefix), path)


def load(path, prefix: str = "", device: torch.device | str = "cpu") -> Q4Weight:
    """Read a weight written by `save` (or any torch.save'd bitsandbytes state dict) onto `device`."""
    sd = torch.load(path, map_location=device, weights_only=True)
    return from_state_dict(sd, prefix)


def _check_keys(key: str, quant_state: dict, names: tuple[str, ...]) -> None:
    missing = [name for name in names if name not in quant_state]
    if missing:
        raise FormatError(
            f"{key} lacks {missing}: it is not a bitsandbytes 4-bit quant state; save the layer from a "
            "quantized bitsandbytes Linear4bit (or bnb_state.to_state_dict)"
        )
