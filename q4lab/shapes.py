"""The canonical shape set: 40 linear layers of public LLMs, each with where its N and K come from.

A shape is a weight `W` of `[N, K]` = `[out_features, in_features]` (docs/DESIGN.md); `N` and `K` are read
off the model's Hugging Face `config.json`, named in `source`. The set covers what the research asks
about: small GQA k/v projections (latency-bound), MoE experts, the square 2048/4096/8192 projections,
8B- and 70B-class MLPs, lm_heads, N that are multiples of 3072 and N that are powers of two. Every K is a
multiple of 64 (the default blocksize); `sweep` checks K against larger blocksizes itself.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import NamedTuple


class Shape(NamedTuple):
    name: str     # "<model>.<layer>", unique
    model: str    # Hugging Face repo id the config comes from
    layer: str    # module name(s) in the model with this weight shape
    N: int        # out_features
    K: int        # in_features
    family: str   # one of FAMILIES, or a sized_shape's: "nsweep", or an experiment's "bench", "configs"
    source: str   # the config.json fields N and K are computed from


SHAPES: tuple[Shape, ...] = (
    # Grouped-query k/v projections: N = num_key_value_heads * head_dim, K = hidden_size.
    Shape("llama-3.2-1b.kv_proj", "meta-llama/Llama-3.2-1B", "k_proj, v_proj", 512, 2048, "gqa_kv",
          "num_key_value_heads=8 * head_dim=64 (hidden_size/num_attention_heads); hidden_size=2048"),
    Shape("qwen3-235b-a22b.kv_proj", "Qwen/Qwen3-235B-A22B", "k_proj, v_proj", 512, 4096, "gqa_kv",
          "num_key_value_heads=4 * head_dim=128; hidden_size=4096"),
    Shape("llama-3-8b.kv_proj", "meta-llama/Meta-Llama-3-8B", "k_proj, v_proj", 1024, 4096, "gqa_kv",
          "num_key_value_heads=8 * head_dim=128; hidden_size=4096"),
    Shape("llama-3-70b.kv_proj", "meta-llama/Meta-Llama-3-70B", "k_proj, v_proj", 1024, 8192, "gqa_kv",
          "num_key_value_heads=8 * head_dim=128; hidden_size=8192"),
    Shape("gemma-2-9b.kv_proj", "google/gemma-2-9b", "k_proj, v_proj", 2048, 3584, "gqa_kv",
          "num_key_value_heads=8 * head_dim=256; hidden_size=3584"),
    # Square projections: q_proj and o_proj where num_attention_heads * head_dim == hidden_size.
    Shape("llama-3.2-1b.q_proj", "meta-llama/Llama-3.2-1B", "q_proj, o_proj", 2048, 2048, "square",
          "num_attention_heads=32 * head_dim=64 = hidden_size=2048"),
    Shape("llama-3.2-3b.q_proj", "meta-llama/Llama-3.2-3B", "q_proj, o_proj", 3072, 3072, "square",
          "num_attention_heads=24 * head_dim=128 = hidden_size=3072"),
    Shape("llama-3-8b.q_proj", "meta-llama/Meta-Llama-3-8B", "q_proj, o_proj", 4096, 4096, "square",
          "num_attention_heads=32 * head_dim=128 = hidden_size=4096"),
    Shape("mixtral-8x22b.q_proj", "mistralai/Mixtral-8x22B-v0.1", "q_proj, o_proj", 6144, 6144, "square",
          "num_attention_heads=48 * head_dim=128 = hidden_size=6144"),
    Shape("llama-3-70b.q_proj", "meta-llama/Meta-Llama-3-70B", "q_proj, o_proj", 8192, 8192, "square",
          "num_attention_heads=64 * head_dim=128 = hidden_size=8192"),
    # Non-square attention projections.
    Shape("qwen3-235b-a22b.q_proj", "Qwen/Qwen3-235B-A22B", "q_proj", 8192, 4096, "attn_q",
          "num_attention_heads=64 * head_dim=128; hidden_size=4096"),
    Shape("gemma-2-9b.q_proj", "google/gemma-2-9b", "q_proj", 4096, 3584, "attn_q",
          "num_attention_heads=16 * head_dim=256; hidden_size=3584"),
    Shape("phi-3-mini.qkv_proj", "microsoft/Phi-3-mini-4k-instruct", "qkv_proj (fused q, k, v)", 9216, 3072,
          "attn_qkv", "(num_attention_heads=32 + 2 * num_key_value_heads=32) * head_dim=96; hidden_size=3072"),
    Shape("qwen3-235b-a22b.o_proj", "Qwen/Qwen3-235B-A22B", "o_proj", 4096, 8192, "attn_o",
          "hidden_size=4096; num_attention_heads=64 * head_dim=128"),
    Shape("gemma-2-9b.o_proj", "google/gemma-2-9b", "o_proj", 3584, 4096, "attn_o",
          "hidden_size=3584; num_attention_heads=16 * head_dim=256"),
    # Dense MLP up (gate_proj has the same shape): N = intermediate_size, K = hidden_size.
    Shape("llama-3.2-1b.up_proj", "meta-llama/Llama-3.2-1B", "gate_proj, up_proj", 8192, 2048, "mlp_up",
          "intermediate_size=8192; hidden_size=2048"),
    Shape("llama-3-8b.up_proj", "meta-llama/Meta-Llama-3-8B", "gate_proj, up_proj", 14336, 4096, "mlp_up",
          "intermediate_size=14336; hidden_size=4096 (Mistral-7B and Mixtral-8x7B experts: the same)"),
    Shape("phi-3-mini.gate_up_proj", "microsoft/Phi-3-mini-4k-instruct", "gate_up_proj (fused gate, up)",
          16384, 3072, "mlp_up", "2 * intermediate_size=8192; hidden_size=3072"),
    Shape("deepseek-v3.up_proj", "deepseek-ai/DeepSeek-V3", "gate_proj, up_proj (dense layers 0-2)",
          18432, 7168, "mlp_up", "intermediate_size=18432; hidden_size=7168"),
    Shape("qwen2.5-7b.up_proj", "Qwen/Qwen2.5-7B", "gate_proj, up_proj", 18944, 3584, "mlp_up",
          "intermediate_size=18944; hidden_size=3584"),
    Shape("gemma-7b.up_proj", "google/gemma-7b", "gate_proj, up_proj", 24576, 3072, "mlp_up",
          "intermediate_size=24576; hidden_size=3072"),
    Shape("llama-3-70b.up_proj", "meta-llama/Meta-Llama-3-70B", "gate_proj, up_proj", 28672, 8192, "mlp_up",
          "intermediate_size=28672; hidden_size=8192"),
    Shape("qwen2.5-72b.up_proj", "Qwen/Qwen2.5-72B", "gate_proj, up_proj", 29568, 8192, "mlp_up",
          "intermediate_size=29568; hidden_size=8192"),
    Shape("gemma-2-27b.up_proj", "google/gemma-2-27b", "gate_proj, up_proj", 36864, 4608, "mlp_up",
          "intermediate_size=36864; hidden_size=4608"),
    # Dense MLP down: N = hidden_size, K = intermediate_size.
    Shape("llama-3.2-1b.down_proj", "meta-llama/Llama-3.2-1B", "down_proj", 2048, 8192, "mlp_down",
          "hidden_size=2048; intermediate_size=8192"),
    Shape("gemma-7b.down_proj", "google/gemma-7b", "down_proj", 3072, 24576, "mlp_down",
          "hidden_size=3072; intermediate_size=24576"),
    Shape("qwen2.5-7b.down_proj", "Qwen/Qwen2.5-7B", "down_proj", 3584, 18944, "mlp_down",
          "hidden_size=3584; intermediate_size=18944"),
    Shape("llama-3-8b.down_proj", "meta-llama/Meta-Llama-3-8B", "down_proj", 4096, 14336, "mlp_down",
          "hidden_size=4096; intermediate_size=14336"),
    Shape("llama-3-70b.down_proj", "meta-llama/Meta-Llama-3-70B", "down_proj", 8192, 28672, "mlp_down",
          "hidden_size=8192; intermediate_size=28672"),
    Shape("qwen2.5-72b.down_proj", "Qwen/Qwen2.5-72B", "down_proj", 8192, 29568, "mlp_down",
          "hidden_size=8192; intermediate_size=29568"),
    # MoE experts, up (gate has the same shape): N = moe_intermediate_size, K = hidden_size.
    Shape("qwen3-30b-a3b.expert_up", "Qwen/Qwen3-30B-A3B", "experts.*.gate_proj, up_proj", 768, 2048,
          "moe_up", "moe_intermediate_size=768; hidden_size=2048"),
    Shape("qwen3-235b-a22b.expert_up", "Qwen/Qwen3-235B-A22B", "experts.*.gate_proj, up_proj", 1536, 4096,
          "moe_up", "moe_intermediate_size=1536; hidden_size=4096"),
    Shape("deepseek-v3.expert_up", "deepseek-ai/DeepSeek-V3", "experts.*.gate_proj, up_proj", 2048, 7168,
          "moe_up", "moe_intermediate_size=2048; hidden_size=7168"),
    Shape("mixtral-8x22b.expert_up", "mistralai/Mixtral-8x22B-v0.1", "experts.*.w1, w3", 16384, 6144,
          "moe_up", "intermediate_size=16384; hidden_size=6144"),
    # MoE experts, down: N = hidden_size, K = moe_intermediate_size.
    Shape("qwen3-30b-a3b.expert_down", "Qwen/Qwen3-30B-A3B", "experts.*.down_proj", 2048, 768, "moe_down",
          "hidden_size=2048; moe_intermediate_size=768"),
    Shape("qwen3-235b-a22b.expert_down", "Qwen/Qwen3-235B-A22B", "experts.*.down_proj", 4096, 1536,
          "moe_down", "hidden_size=4096; moe_intermediate_size=1536"),
    Shape("deepseek-v3.expert_down", "deepseek-ai/DeepSeek-V3", "experts.*.down_proj", 7168, 2048,
          "moe_down", "hidden_size=7168; moe_intermediate_size=2048"),
    Shape("mixtral-8x22b.expert_down", "mistralai/Mixtral-8x22B-v0.1", "experts.*.w2", 6144, 16384,
          "moe_down", "hidden_size=6144; intermediate_size=16384"),
    # Output heads: N = vocab_size, K = hidden_size.
    Shape("llama-3-8b.lm_head", "meta-llama/Meta-Llama-3-8B", "lm_head", 128256, 4096, "lm_head",
          "vocab_size=128256; hidden_size=4096"),
    Shape("qwen2.5-7b.lm_head", "Qwen/Qwen2.5-7B", "lm_head", 152064, 3584, "lm_head",
          "vocab_size=152064; hidden_size=3584"),
)

FAMILIES: tuple[str, ...] = tuple(dict.fromkeys(s.family for s in SHAPES))
_BY_NAME = {s.name: s for s in SHAPES}


class Model(NamedTuple):
    name: str                                # the prefix of its shapes' names
    n_layers: int                            # decoder layers (num_hidden_layers)
    per_layer: tuple[tuple[str, int], ...]   # (canonical shape, weights of that shape in one layer)
    once: tuple[tuple[str, int], ...]        # (canonical shape, count) outside the layers: the lm_head
    left_out: str                            # linear layers of the model that are not canonical shapes


# Dense decoders whose every per-layer linear is a canonical shape: q_proj and o_proj share one shape, so do
# k_proj and v_proj, and gate_proj and up_proj. One decode step runs each weight once.
_LLAMA_LAYER = (("q_proj", 2), ("kv_proj", 2), ("up_proj", 2), ("down_proj", 1))
MODELS: dict[str, Model] = {m.name: m for m in (
    Model("llama-3-8b", 32, tuple((f"llama-3-8b.{s}", c) for s, c in _LLAMA_LAYER), (("llama-3-8b.lm_head", 1),), ""),
    Model("llama-3-70b", 80, tuple((f"llama-3-70b.{s}", c) for s, c in _LLAMA_LAYER), (),
          "lm_head [128256, 8192] (not a canonical shape)"),
    Model("llama-3.2-1b", 16, tuple((f"llama-3.2-1b.{s}", c) for s, c in _LLAMA_LAYER), (),
          "lm_head [128256, 2048] (tied to the embedding; not a canonical shape)"),
)}


def model_layers(model: str) -> list[tuple[Shape, int]]:
    """(shape, how many weights of that shape one decode step of `model` runs), over the whole model."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; models with layer counts: {sorted(MODELS)}")
    m = MODELS[model]
    return [(get(s), c * m.n_layers) for s, c in m.per_layer] + [(get(s), c) for s, c in m.once]


def get(name: str) -> Shape:
    """The canonical shape called `name`; an unknown name raises with the closest known ones."""
    if name in _BY_NAME:
        return _BY_NAME[name]
    close = difflib.get_close_matches(name, list(_BY_NAME), n=5, cutoff=0.4)
    hint = f"close matches: {close}" if close else f"known shapes: {sorted(_BY_NAME)}"
    raise ValueError(f"unknown shape {name!r}; {hint} (or a family: {list(FAMILIES)})")


def by_family(family: str) -> list[Shape]:
    """All canonical shapes of one family, in canonical order."""
    if family not in FAMILIES:
        raise ValueError(f"unknown shape family {family!r}; families: {list(FAMILIES)}")
    return [s for s in SHAPES if s.family == family]


def select(spec: str | Iterable[str]) -> list[Shape]:
    """Shapes named by names, families and "all", comma-separated in a string or in the items of a list,
    without repeats."""
    items = [spec] if isinstance(spec, str) else spec
    tokens = [t.strip() for item in items for t in str(item).split(",") if t.strip()]
    if not tokens:
        raise ValueError("no shapes selected; give shape names, families or 'all'")
    picked: dict[str, Shape] = {}
    for token in tokens:
        found = SHAPES if token == "all" else by_family(token) if token in FAMILIES else [get(token)]
        picked.update((s.name, s) for s in found)
    return list(picked.values())


def sized_shape(N: int, K: int, family: str) -> Shape:
    """A shape of no model, given by its sizes alone: named "n{N}_k{K}", in `family` ("nsweep" for a point of
    an N sweep, or an experiment's "bench", "configs")."""
    if N <= 0 or K <= 0:
        raise ValueError(f"N and K must be positive, got N={N}, K={K}")
    return Shape(f"n{N}_k{K}", "", "", N, K, family, "N and K given")


# ---------------------------------------------------------------------------------------------------------
def add_shapes_arguments(parser) -> None:
    parser.add_argument("select", nargs="*", default=["all"], metavar="SHAPE_OR_FAMILY",
                        help=f"shape names or families to list (default: all; families: {', '.join(FAMILIES)})")


def shapes_command(args) -> int:
    """Print the selected canonical shapes, one a line: what `--shapes` of `q4lab sweep grid` and a
    notebook's `shapes` take."""
    picked = select(args.select)
    width = max(len(s.name) for s in picked)
    print(f"{'shape':<{width}}  {'family':<9} {'N':>7} {'K':>6}  model")
    for s in picked:
        print(f"{s.name:<{width}}  {s.family:<9} {s.N:>7} {s.K:>6}  {s.model}")
    return 0
