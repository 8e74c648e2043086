"""The canonical shape set: its size, coverage of what the research asks about, and lookups."""
import pytest

from q4lab import shapes
from q4lab.shapes import SHAPES


def test_forty_unique_shapes_with_provenance():
    assert len(SHAPES) == 40
    assert len({s.name for s in SHAPES}) == 40
    for s in SHAPES:
        assert s.model and s.layer and s.source, s
        assert s.N > 0 and s.K > 0
    # one name prefix per model, so that names say which model a shape is from
    prefixes = {}
    for s in SHAPES:
        prefixes.setdefault(s.model, set()).add(s.name.rsplit(".", 1)[0])
    assert all(len(p) == 1 for p in prefixes.values()), prefixes


def test_every_K_is_a_multiple_of_the_default_blocksize():
    assert [s.name for s in SHAPES if s.K % 64] == []


def test_required_families_and_shapes_are_present():
    assert {"gqa_kv", "moe_up", "moe_down", "square", "mlp_up", "mlp_down", "lm_head"} <= set(shapes.FAMILIES)
    NK = {(s.N, s.K) for s in SHAPES}
    assert {(1536, 4096), (4096, 1536)} <= NK                   # Qwen3-235B-A22B expert up and down
    assert {(2048, 2048), (4096, 4096), (8192, 8192)} <= NK     # the squares
    assert {(14336, 4096), (4096, 14336)} <= NK                 # 8B-class MLP up/down
    assert {(28672, 8192), (8192, 28672)} <= NK                 # 70B-class MLP up/down
    assert (128256, 4096) in NK                                 # Llama-3 lm_head
    assert all(s.N <= 2048 for s in shapes.by_family("gqa_kv"))
    assert len({s.N for s in SHAPES if s.N % 3072 == 0}) >= 3
    assert len({s.N for s in SHAPES if s.N & (s.N - 1) == 0}) >= 3


def test_get_and_by_family():
    s = shapes.get("llama-3-8b.kv_proj")
    assert (s.N, s.K, s.family) == (1024, 4096, "gqa_kv")
    assert s in shapes.by_family("gqa_kv")
    assert [x.name for x in shapes.by_family("moe_up")] == [
        "qwen3-30b-a3b.expert_up", "qwen3-235b-a22b.expert_up", "deepseek-v3.expert_up", "mixtral-8x22b.expert_up"]


def test_unknown_names_list_close_matches():
    with pytest.raises(ValueError, match="llama-3-8b.kv_proj"):
        shapes.get("llama3-8b.kv")
    with pytest.raises(ValueError, match="gqa_kv"):
        shapes.by_family("gqa")


def test_select_names_families_and_all_without_repeats():
    assert shapes.select("all") == list(SHAPES)
    picked = shapes.select("gqa_kv,llama-3-8b.kv_proj,square")
    assert [s.family for s in picked].count("gqa_kv") == len(shapes.by_family("gqa_kv"))
    assert len(picked) == len({s.name for s in picked})
    assert shapes.select(["llama-3-8b.q_proj"]) == [shapes.get("llama-3-8b.q_proj")]
    with pytest.raises(ValueError, match="no shapes"):
        shapes.select(" , ")
    with pytest.raises(ValueError, match="unknown shape"):
        shapes.select("all,nonsense")


def test_sized_shape_is_named_by_its_sizes_in_the_family_given():
    s = shapes.sized_shape(4160, 4096, "nsweep")
    assert (s.name, s.N, s.K, s.family) == ("n4160_k4096", 4160, 4096, "nsweep")
    bench = shapes.sized_shape(96, 128, "bench")
    assert (bench.name, bench.model, bench.family) == ("n96_k128", "", "bench")
    with pytest.raises(ValueError, match="N and K must be positive"):
        shapes.sized_shape(0, 4096, "bench")


def test_model_layers_count_every_weight_of_a_decode_step():
    layers = shapes.model_layers("llama-3-8b")
    assert sum(count for _, count in layers) == 32 * 7 + 1  # q, k, v, o, gate, up, down per layer, and lm_head
    assert {s.model for s, _ in layers} == {"meta-llama/Meta-Llama-3-8B"}
    for name, model in shapes.MODELS.items():
        assert all(s.name.startswith(name + ".") for s, _ in shapes.model_layers(name))
        assert model.once or model.left_out  # a model without its lm_head says so
    with pytest.raises(ValueError, match="unknown model 'gpt-2'.*llama-3-8b"):
        shapes.model_layers("gpt-2")
