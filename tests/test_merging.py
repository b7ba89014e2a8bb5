"""Merge methods (lorachain.merging), LoRA file reading and the gradient-fusion math, on hand-made tensors."""

from __future__ import annotations

import json
import math

import pytest

from lorachain.lora import Concept, LayerAdapter, LoraFileError, check_compatible, linear_combination, read_lora
from lorachain.merging.fusion import GramError, GramRecorder, fuse_layer, load_grams, save_grams
from lorachain.methods import MergeError, make_merge, merge_class, merge_names
from lorachain.methods.blocklora import block_mask, block_rows
from lorachain.methods.orthogonal_adaptation import orthogonal_basis, slot_down_projection
from lorachain.methods.weighted_average import WeightedAverage
from lorachain.torch_env import torch

LAYERS = {"down.attn1.to_q": (12, 10), "down.attn2.to_k": (12, 16), "up.attn1.to_out.0": (8, 12)}  # layer -> (out, in)


def random_adapter(out_features, in_features, rank=4, seed=0, scale=0.5) -> LayerAdapter:
    g = torch.Generator().manual_seed(seed)
    return LayerAdapter(
        A=torch.randn(rank, in_features, generator=g), B=torch.randn(out_features, rank, generator=g), scale=scale
    )


def random_concept(name, seed, rank=4, layers=LAYERS, scale=0.5) -> Concept:
    return Concept(
        name=name,
        adapters={
            layer: random_adapter(o, i, rank, seed * 100 + n, scale)
            for n, (layer, (o, i)) in enumerate(sorted(layers.items()))
        },
    )


def block_concept(name, slot, num_blocks, seed, rank=4) -> Concept:
    """A BlockLoRA concept: random factors with B's rows outside the slot's block zeroed."""
    concept = random_concept(name, seed, rank)
    for adapter in concept.adapters.values():
        adapter.B = adapter.B * block_mask(adapter.B.shape[0], num_blocks, slot)
    return concept


def exact_sum(concepts, weights, layer):
    return sum(
        w * c.adapters[layer].scale * (c.adapters[layer].B.double() @ c.adapters[layer].A.double())
        for c, w in zip(concepts, weights)
    )


# ------------------------------------------------------------------------------------------ registry


def test_registry_and_parameters():
    assert merge_names() == [
        "blocklora",
        "dare",
        "gradient_fusion",
        "orthogonal_adaptation",
        "ties",
        "weighted_average",
    ]
    assert [n for n in merge_names() if merge_class(n).needs_layer_inputs] == ["gradient_fusion"]
    assert make_merge("weighted_average").params == {"weights": "mean"}
    assert make_merge("ties").params == {"weights": 1.0, "density": 0.2, "majority_sign_method": "total"}
    assert make_merge("dare").params == {
        "weights": 1.0,
        "variant": "linear",
        "density": 0.5,
        "seed": 0,
        "majority_sign_method": "total",
    }
    assert make_merge("orthogonal_adaptation").params == {"weights": 0.6}
    assert make_merge("gradient_fusion").params == {
        "weights": "mean",
        "ridge": 1e-6,
        "prior": "mean",
        "rcond": 1e-10,
        "inputs": "images",
        "cross_attention_rows": "all",
    }


def test_unknown_method_and_parameter_name_the_key():
    with pytest.raises(MergeError) as info:
        make_merge("svd_magic", key="merges.fast")
    assert (
        "merges.fast" in str(info.value) and "'svd_magic'" in str(info.value) and "weighted_average" in str(info.value)
    )
    with pytest.raises(
        MergeError,
        match=(
            r"merges\.t: merge 'ties' has no parameter\(s\) \['lambda'\]; "
            r"it accepts \['density', 'majority_sign_method', 'weights'\]"
        ),
    ):
        make_merge("ties", {"lambda": 1}, key="merges.t")
    for name, params, word in [
        ("ties", {"density": 0}, "density"),
        ("ties", {"density": 1.5}, "density"),
        ("ties", {"majority_sign_method": "vote"}, "majority_sign_method"),
        ("dare", {"variant": "svd"}, "variant"),
        ("dare", {"seed": 1.5}, "seed"),
        ("gradient_fusion", {"ridge": -1}, "ridge"),
        ("gradient_fusion", {"prior": "zero"}, "prior"),
        ("weighted_average", {"weights": "median"}, "weights"),
        ("ties", {"weights": -1}, "weights"),
        ("ties", {"weights": [1, -0.5]}, "weights"),
    ]:
        with pytest.raises(MergeError, match=rf"config key merges\.x: merge '{name}'.*'{word}'"):
            make_merge(name, params, key="merges.x")


# ------------------------------------------------------------------------------------------ bad input


def test_zero_concepts_refused_by_every_method():
    for name in merge_names():
        with pytest.raises(MergeError, match="no concepts to merge"):
            make_merge(name).merge([])


@pytest.mark.parametrize("name", ["weighted_average", "blocklora"])
def test_weights_must_sum_to_one_where_the_paper_says_so(name):
    concepts = [block_concept("a", 0, 2, 1), block_concept("b", 1, 2, 2)]
    with pytest.raises(MergeError, match=r"merges\.m: merge .*'weights' sums to 0\.9.*requires weights that sum to 1"):
        make_merge(name, {"weights": [0.5, 0.4]}, key="merges.m")
    if name == "weighted_average":
        with pytest.raises(MergeError, match=r"'weights' is the constant 0\.5.*requires weights that sum to 1"):
            make_merge(name, {"weights": 0.5})
    else:  # BlockLoRA's disjoint blocks: alpha = 1 keeps each concept's rows exactly its own model
        merged = make_merge(name, {"weights": 1.0}).merge(concepts)
        alone = make_merge(name, {"weights": 1.0}).merge(concepts[:1])
        layer = next(iter(alone))
        rows = (concepts[0].adapters[layer].B != 0).any(dim=1)
        assert torch.equal(merged[layer][rows], alone[layer][rows])
    make_merge(name, {"weights": [0.3, 0.7]}).merge(concepts)
    make_merge(name, {"weights": [0.1] * 10})  # accepted: sums to 1 within 1e-6 (float rounding)


def test_wrong_weight_count_names_the_parameter():
    concepts = [random_concept("a", 1), random_concept("b", 2), random_concept("c", 3)]
    for name, weights in [("weighted_average", [0.5, 0.5]), ("ties", [1.0, 1.0]), ("orthogonal_adaptation", [0.6] * 4)]:
        with pytest.raises(
            MergeError,
            match=(
                rf"config key merges\.w: merge '{name}': parameter 'weights' has {len(weights)} value\(s\) "
                r"but 3 concept\(s\)"
            ),
        ):
            make_merge(name, {"weights": weights}, key="merges.w").merge(concepts)


def test_different_layer_sets_and_shapes_name_both_concepts():
    a = random_concept("loras/a.safetensors", 1)
    fewer = random_concept(
        "loras/b.safetensors", 2, layers={k: v for k, v in LAYERS.items() if k != "up.attn1.to_out.0"}
    )
    with pytest.raises(
        LoraFileError,
        match=r"loras/b\.safetensors and loras/a\.safetensors adapt different layers.*'up\.attn1\.to_out\.0'",
    ):
        make_merge("weighted_average").merge([a, fewer])
    wider = random_concept("loras/c.safetensors", 3, layers={**LAYERS, "down.attn2.to_k": (12, 20)})
    with pytest.raises(
        LoraFileError,
        match=(
            r"loras/a\.safetensors and loras/c\.safetensors differ at layer 'down\.attn2\.to_k'"
            r".*\(12, 16\) vs \(12, 20\)"
        ),
    ):
        make_merge("ties").merge([a, wider])


def test_different_ranks_refused_only_where_equal_rank_is_needed():
    a, b = random_concept("a.safetensors", 1, rank=4), random_concept("b.safetensors", 2, rank=8)
    make_merge("weighted_average").merge([a, b])  # ranks may differ for an exact delta sum

    class EqualRankAverage(WeightedAverage):  # not registered: only the flag differs
        name = "equal_rank_average"
        needs_equal_rank = True

    with pytest.raises(
        LoraFileError, match=r"a\.safetensors and b\.safetensors differ at layer 'down\.attn1\.to_q': rank 4 vs 8"
    ):
        EqualRankAverage().merge([a, b])


# ------------------------------------------------------------------------------------------ weighted average


def test_weighted_average_is_the_exact_delta_sum():
    concepts = [random_concept(f"c{i}", i, rank=4 + i) for i in range(3)]
    weights = [0.2, 0.3, 0.5]
    merged = make_merge("weighted_average", {"weights": weights}).merge(concepts)
    assert sorted(merged) == sorted(LAYERS)
    for layer, delta in merged.items():
        assert delta.dtype == torch.float32 and tuple(delta.shape) == LAYERS[layer]
        torch.testing.assert_close(delta.double(), exact_sum(concepts, weights, layer), rtol=1e-5, atol=1e-5)
    mean = make_merge("weighted_average").merge(concepts)
    torch.testing.assert_close(
        mean["down.attn1.to_q"].double(), exact_sum(concepts, [1 / 3] * 3, "down.attn1.to_q"), rtol=1e-5, atol=1e-5
    )


def test_peft_linear_combination_adds_cross_terms_cat_does_not():
    """peft's add_weighted_adapter("linear") mixes A's and B's separately (cross terms B_i A_j);
    our weighted average equals its exact "cat" combination instead."""
    from peft import LoraConfig, get_peft_model

    out_features, in_features, rank = 12, 10, 4
    model = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(in_features, out_features, bias=False)),
        LoraConfig(r=rank, lora_alpha=8, target_modules=["0"], init_lora_weights="gaussian"),
        adapter_name="dog",
    )
    model.add_adapter("cat", LoraConfig(r=rank, lora_alpha=8, target_modules=["0"], init_lora_weights="gaussian"))
    layer = model.base_model.model[0]
    concepts = []
    for seed, adapter_name in enumerate(["dog", "cat"]):
        adapter = random_adapter(out_features, in_features, rank, seed=seed, scale=8 / rank)
        layer.lora_A[adapter_name].weight.data.copy_(adapter.A)
        layer.lora_B[adapter_name].weight.data.copy_(adapter.B)
        concepts.append(Concept(name=adapter_name, adapters={"0": adapter}))
    weights = [0.5, 0.5]
    ours = make_merge("weighted_average", {"weights": weights}).merge(concepts)["0"]
    model.add_weighted_adapter(["dog", "cat"], weights, "combined_linear", combination_type="linear")
    model.add_weighted_adapter(["dog", "cat"], weights, "combined_cat", combination_type="cat")
    with torch.no_grad():
        peft_linear = layer.get_delta_weight("combined_linear")
        peft_cat = layer.get_delta_weight("combined_cat")
    torch.testing.assert_close(ours, peft_cat, rtol=1e-5, atol=1e-5)
    assert (ours - peft_linear).abs().max() > 0.1 * ours.abs().max()  # the cross terms are not small


def test_linear_combination_matches_dense():
    adapters = [random_adapter(6, 5, rank=r, seed=r, scale=1 / r) for r in (2, 3)]
    dense = 0.3 * adapters[0].delta() + 1.7 * adapters[1].delta()
    torch.testing.assert_close(linear_combination(adapters, [0.3, 1.7]), dense, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ TIES / DARE


def test_ties_is_peft_ties_on_full_deltas():
    from peft.utils.merge_utils import ties

    concepts = [random_concept(f"c{i}", i) for i in range(3)]
    merged = make_merge("ties", {"density": 0.4, "weights": [1.0, 0.5, 2.0]}).merge(concepts)
    for layer in LAYERS:
        expected = ties(
            [c.delta(layer) for c in concepts], torch.tensor([1.0, 0.5, 2.0]), density=0.4, majority_sign_method="total"
        )
        torch.testing.assert_close(merged[layer], expected)
    assert torch.equal(
        make_merge("ties").merge(concepts)["down.attn1.to_q"], make_merge("ties").merge(concepts)["down.attn1.to_q"]
    )


@pytest.mark.parametrize("variant", ["linear", "ties"])
def test_dare_is_peft_dare_seeded_per_layer_and_reproducible(variant):
    from peft.utils.merge_utils import dare_linear, dare_ties

    concepts = [random_concept(f"c{i}", i) for i in range(3)]
    params = {"variant": variant, "density": 0.3, "seed": 7}
    torch.manual_seed(123)
    state_before = torch.random.get_rng_state()
    merged = make_merge("dare", params).merge(concepts)
    assert torch.equal(torch.random.get_rng_state(), state_before)  # the caller's RNG is untouched
    for index, layer in enumerate(sorted(LAYERS)):
        torch.manual_seed(7 + index)  # the documented seeding: seed + position in sorted layer order
        deltas = [c.delta(layer) for c in concepts]
        expected = (
            dare_linear(deltas, torch.ones(3), 0.3)
            if variant == "linear"
            else dare_ties(deltas, torch.ones(3), 0.3, "total")
        )
        torch.testing.assert_close(merged[layer], expected)
    # reproducible whatever ran before; another seed draws other masks
    torch.rand(1000)
    again = make_merge("dare", params).merge(concepts)
    assert all(torch.equal(merged[layer], again[layer]) for layer in LAYERS)
    other = make_merge("dare", {**params, "seed": 8}).merge(concepts)
    assert not torch.equal(merged["down.attn1.to_q"], other["down.attn1.to_q"])


# ------------------------------------------------------------------------------------------ orthogonal adaptation


def test_orthogonal_down_projections_of_different_slots_are_orthogonal_and_deterministic():
    in_features, rank = 40, 4
    projections = [slot_down_projection(in_features, rank, slot, seed=3) for slot in range(in_features // rank)]
    stacked = torch.cat(projections).double()
    torch.testing.assert_close(stacked @ stacked.T, torch.eye(in_features, dtype=torch.float64), atol=1e-6, rtol=0)
    assert (projections[0].double() @ projections[5].double().T).abs().max() < 1e-6
    assert torch.equal(slot_down_projection(in_features, rank, 2, seed=3), projections[2])  # deterministic (and cached)
    assert not torch.allclose(slot_down_projection(in_features, rank, 2, seed=4), projections[2])
    basis = orthogonal_basis(in_features, 3)
    basis.zero_()  # callers get a copy; the cache stays intact
    assert torch.equal(slot_down_projection(in_features, rank, 2, seed=3), projections[2])
    with pytest.raises(ValueError, match=r"slot 10 with rank 4 .* in_features is 40: at most 10 concept slots"):
        slot_down_projection(in_features, rank, 10, seed=3)
    with pytest.raises(ValueError, match="slot -1"):
        slot_down_projection(in_features, rank, -1, seed=3)


def test_orthogonal_adaptation_merges_by_scaled_summation():
    concepts = []
    for slot in range(3):
        adapters = {}
        for n, (layer, (o, i)) in enumerate(sorted(LAYERS.items())):
            adapter = random_adapter(o, i, 2, seed=10 * slot + n)
            adapter.A = slot_down_projection(i, 2, slot, seed=0)
            adapters[layer] = adapter
        concepts.append(Concept(name=f"slot{slot}", adapters=adapters, slot=slot))
    merged = make_merge("orthogonal_adaptation").merge(concepts)
    for layer in LAYERS:
        torch.testing.assert_close(merged[layer].double(), exact_sum(concepts, [0.6] * 3, layer), rtol=1e-5, atol=1e-6)
    explicit = make_merge("orthogonal_adaptation", {"weights": [1.0, 0.0, 0.5]}).merge(concepts)
    torch.testing.assert_close(
        explicit["down.attn1.to_q"].double(),
        exact_sum(concepts, [1.0, 0.0, 0.5], "down.attn1.to_q"),
        rtol=1e-5,
        atol=1e-6,
    )


# ------------------------------------------------------------------------------------------ BlockLoRA


def test_block_rows_follow_tensor_split_and_refuse_missing_blocks():
    for out_features, num_blocks in [(1280, 15), (12, 4), (10, 3), (7, 7)]:
        expected = torch.tensor_split(torch.arange(out_features), num_blocks)
        for slot in range(num_blocks):
            rows = block_rows(out_features, num_blocks, slot)
            assert torch.equal(torch.arange(out_features)[rows], expected[slot])
            mask = block_mask(out_features, num_blocks, slot)
            assert mask.shape == (out_features, 1) and int(mask.sum()) == len(expected[slot])
    assert [block_rows(1280, 15, s).stop - block_rows(1280, 15, s).start for s in (0, 4, 5, 14)] == [86, 86, 85, 85]
    with pytest.raises(ValueError, match=r"slot 4 is outside 0\.\.3.*num_blocks=4.*more concepts than blocks"):
        block_rows(12, 4, 4)
    with pytest.raises(ValueError, match="slot -1"):
        block_mask(12, 4, -1)
    with pytest.raises(ValueError, match="do not fit"):
        block_rows(3, 4, 0)


def test_blocklora_merge_keeps_each_concepts_rows_by_default_and_eq5_shrinks_them():
    concepts = [block_concept(f"concept{k}", k, 3, seed=k) for k in range(3)]
    assert make_merge("blocklora").params == {"weights": 1.0}
    merged = make_merge("blocklora").merge(concepts)  # alpha_i = 1: every block is its own concept's delta
    for layer in LAYERS:
        for slot, concept in enumerate(concepts):
            rows = block_rows(LAYERS[layer][0], 3, slot)
            assert torch.equal(merged[layer][rows], make_merge("blocklora").merge([concept])[layer][rows])
    eq5 = make_merge("blocklora", {"weights": "mean"}).merge(concepts)
    for layer in LAYERS:
        torch.testing.assert_close(eq5[layer] * 3, merged[layer], rtol=1e-5, atol=1e-6)


def test_blocklora_merge_is_the_weighted_sum_of_disjoint_blocks():
    concepts = [block_concept(f"concept{k}", k, 3, seed=k) for k in range(3)]
    merged = make_merge("blocklora", {"weights": "mean"}).merge(concepts)
    for layer in LAYERS:
        torch.testing.assert_close(
            merged[layer].double(), exact_sum(concepts, [1 / 3] * 3, layer), rtol=1e-5, atol=1e-6
        )
        # each block of rows holds exactly one concept's (scaled) delta
        rows = block_rows(LAYERS[layer][0], 3, 1)
        torch.testing.assert_close(merged[layer][rows], concepts[1].delta(layer)[rows] / 3, rtol=1e-5, atol=1e-6)


def test_blocklora_refuses_overlapping_rows_naming_concepts_and_layer():
    concepts = [
        block_concept("objects/dog", 0, 3, seed=1),
        block_concept("objects/cat", 1, 3, seed=2),
        block_concept("styles/ink", 1, 3, seed=3),
    ]
    with pytest.raises(
        MergeError,
        match=(
            r"merge 'blocklora': concepts 'objects/cat' and 'styles/ink' "
            r"both change rows .* of layer 'down\.attn1\.to_q'"
        ),
    ):
        make_merge("blocklora").merge(concepts)
    plain = random_concept("plain_lora", 4)  # an unmasked LoRA overlaps every block
    with pytest.raises(MergeError, match=r"'objects/dog' and 'plain_lora'"):
        make_merge("blocklora").merge([concepts[0], plain])
    # rows where B is nonzero but B @ A is zero do not count as changed
    lazy = block_concept("lazy", 1, 3, seed=5)
    for adapter in lazy.adapters.values():
        adapter.B = adapter.B + block_mask(adapter.B.shape[0], 3, 0) * 1.0  # touch block 0's rows of B ...
        adapter.A = torch.cat([adapter.A[:-1], torch.zeros(1, adapter.A.shape[1])])  # ... only through a dead rank
        adapter.B[block_rows(adapter.B.shape[0], 3, 0), :-1] = 0
    make_merge("blocklora", {"weights": [0.5, 0.5]}).merge([concepts[0], lazy])


# ------------------------------------------------------------------------------------------ gradient fusion


def _layer_problem(out_features=6, in_features=5, rows=(20, 30), seed=0):
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(out_features, in_features, generator=g, dtype=torch.float64)
    Xs = [torch.randn(n, in_features, generator=g, dtype=torch.float64) for n in rows]
    adapters = [
        random_adapter(out_features, in_features, rank=2, seed=seed + 10 + i, scale=0.5) for i in range(len(rows))
    ]
    return W0, Xs, adapters


def test_fuse_layer_matches_a_direct_least_squares_solve():
    W0, Xs, adapters = _layer_problem()
    deltas = [a.delta().double() for a in adapters]
    # stacked problem [X_1; X_2] W^T = [X_1 (W0 + d1)^T; X_2 (W0 + d2)^T]
    stacked = torch.cat(Xs)
    targets = torch.cat([X @ (W0 + d).T for X, d in zip(Xs, deltas)])
    W_star = torch.linalg.lstsq(stacked, targets).solution.T
    grams = [X.T @ X for X in Xs]
    exact = fuse_layer(adapters, grams, ridge=0.0)
    torch.testing.assert_close(W0 + exact.double(), W_star, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        fuse_layer(deltas, grams, ridge=0.0), exact, rtol=1e-6, atol=1e-6
    )  # dense or factors: same
    torch.testing.assert_close(
        W0 + fuse_layer(adapters, grams).double(), W_star, rtol=1e-4, atol=1e-4
    )  # default ridge 1e-6
    # with a ridge toward the mean: the stacked problem with sqrt(lam) I rows targeting W0 + mean delta
    ridge = 0.1
    lam = ridge * float(torch.diagonal(sum(grams) / 2).mean())
    width = W0.shape[1]
    stacked_ridge = torch.cat([X / math.sqrt(2) for X in Xs] + [math.sqrt(lam) * torch.eye(width, dtype=torch.float64)])
    targets_ridge = torch.cat(
        [X @ (W0 + d).T / math.sqrt(2) for X, d in zip(Xs, deltas)] + [math.sqrt(lam) * (W0 + sum(deltas) / 2).T]
    )
    W_ridge = torch.linalg.lstsq(stacked_ridge, targets_ridge).solution.T
    torch.testing.assert_close(W0 + fuse_layer(adapters, grams, ridge=ridge).double(), W_ridge, rtol=1e-5, atol=1e-5)
    # prior "base": the literal (sum d_i G_i)(G + lam I)^-1 with G = sum_i w_i G_i, w_i = 1/2
    G = sum(grams) / 2
    literal = torch.linalg.solve(
        G + lam * torch.eye(width, dtype=torch.float64), (sum(d @ g for d, g in zip(deltas, grams)) / 2).T
    ).T
    torch.testing.assert_close(
        fuse_layer(adapters, grams, ridge=ridge, prior="base").double(), literal, rtol=1e-5, atol=1e-5
    )


# prior "base" with a ridge > 0 shrinks weakly excited directions toward W0 by design (documented)
@pytest.mark.parametrize(("ridge", "prior"), [(0.0, "mean"), (1e-6, "mean"), (0.5, "mean"), (0.0, "base")])
def test_fusing_one_concept_reproduces_its_outputs_even_when_rank_deficient(ridge, prior):
    W0, Xs, adapters = _layer_problem(out_features=8, in_features=16, rows=(5,), seed=3)  # 5 rows < 16 features
    X = Xs[0]
    G = X.T @ X
    assert int(torch.linalg.matrix_rank(G)) == 5
    fused = fuse_layer(adapters, [G], ridge=ridge, prior=prior).double()
    torch.testing.assert_close(fused @ X.T, adapters[0].delta().double() @ X.T, rtol=1e-5, atol=1e-5)
    if prior == "mean":  # and the unexcited directions keep the concept's own delta
        torch.testing.assert_close(fused, adapters[0].delta().double(), rtol=1e-5, atol=1e-5)


def test_gradient_fusion_merge_method_and_missing_grams():
    W0, Xs, adapters = _layer_problem(rows=(20, 30))
    concepts = [
        Concept(name=f"concept{i}", adapters={"attn.to_q": a}, grams={"attn.to_q": (X.T @ X, X.shape[0])})
        for i, (a, X) in enumerate(zip(adapters, Xs))
    ]
    merged = make_merge("gradient_fusion", {"ridge": 0.0}).merge(concepts)
    torch.testing.assert_close(merged["attn.to_q"], fuse_layer(adapters, [X.T @ X for X in Xs], ridge=0.0))
    with pytest.raises(
        MergeError, match=r"merges\.gf: merge 'gradient_fusion': concept 'concept1' has no recorded layer inputs"
    ):
        make_merge("gradient_fusion", key="merges.gf").merge([concepts[0], Concept("concept1", concepts[1].adapters)])
    missing_layer = Concept("concept1", concepts[1].adapters, grams={"attn.to_k": concepts[1].grams["attn.to_q"]})
    with pytest.raises(MergeError, match=r"concept 'concept1' has no recorded inputs \(gram\) for layer 'attn\.to_q'"):
        make_merge("gradient_fusion").merge([concepts[0], missing_layer])
    wrong_width = Concept("concept1", concepts[1].adapters, grams={"attn.to_q": (torch.eye(4, dtype=torch.float64), 3)})
    with pytest.raises(MergeError, match=r"concept 'concept1'.*layer 'attn\.to_q' is \(4, 4\).*\(5, 5\)"):
        make_merge("gradient_fusion").merge([concepts[0], wrong_width])
    with pytest.raises(GramError, match="no inputs were recorded"):
        fuse_layer(adapters[:1], [torch.zeros(5, 5, dtype=torch.float64)])


def test_gram_recorder_accumulates_xtx_of_flattened_inputs(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    first, second = torch.randn(2, 5, 4), torch.randn(7, 4)
    with GramRecorder(model, ["0", "2"]) as recorder:
        model(first)
        model(second)
    model(torch.randn(3, 4))  # hooks are gone after the block
    grams = recorder.grams
    assert sorted(grams) == ["0", "2"]
    X0 = torch.cat([first.reshape(-1, 4), second]).double()
    G0, n0 = grams["0"]
    assert n0 == 17 and G0.dtype == torch.float64
    torch.testing.assert_close(G0, X0.T @ X0)
    with torch.no_grad():
        X2 = torch.relu(model[0](torch.cat([first.reshape(-1, 4), second]))).double()
    torch.testing.assert_close(grams["2"][0], X2.T @ X2, rtol=1e-6, atol=1e-6)
    # save / load: float32 on disk by default, float64 back
    save_grams(tmp_path / "grams.safetensors", grams)
    loaded = load_grams(tmp_path / "grams.safetensors")
    assert sorted(loaded) == ["0", "2"] and loaded["0"][1] == 17 and loaded["0"][0].dtype == torch.float64
    torch.testing.assert_close(loaded["0"][0], G0, rtol=1e-6, atol=1e-6)
    save_grams(tmp_path / "grams64.safetensors", grams, dtype=torch.float64)
    assert torch.equal(load_grams(tmp_path / "grams64.safetensors")["0"][0], G0)
    # bad use
    with GramRecorder(model, ["0", "3"]) as unused:
        model[0](torch.randn(2, 4))
    assert unused.unseen == ["3"] and sorted(unused.grams) == ["0"]
    with pytest.raises(GramError, match="no submodule '9'"):
        GramRecorder(model, ["9"])
    with pytest.raises(GramError, match="'1' is a ReLU, not a linear layer"):
        GramRecorder(model, ["1"])
    with pytest.raises(GramError, match="not a gram file"):
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
        load_grams(tmp_path / "other.safetensors")


class SharedInputs(torch.nn.Module):
    """Like an attention block: q, k, v read one tensor; k2 / v2 read the text embeddings."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(4, 4) for _ in range(3))
        self.k2, self.v2 = torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)

    def forward(self, x, text):
        out = self.q(x) + self.k(x)
        x.mul_(2.0)  # an in-place change: v must not reuse the product of the old values
        return out + self.v(x) + self.k2(text).sum() + self.v2(text).sum()


def test_gram_recorder_reuses_products_of_shared_inputs_and_save_stores_duplicates_once(tmp_path, monkeypatch):
    from safetensors import safe_open

    model = SharedInputs()
    x, text = torch.randn(3, 5, 4), torch.randn(3, 7, 6)
    products = []
    original_matmul = torch.Tensor.__matmul__
    monkeypatch.setattr(
        torch.Tensor, "__matmul__", lambda a, b: products.append(tuple(a.shape)) or original_matmul(a, b)
    )
    with GramRecorder(model, ["q", "k", "v", "k2", "v2"]) as recorder, torch.no_grad():
        model(x.clone(), text)
    monkeypatch.undo()
    assert products == [(4, 15), (4, 15), (6, 21)]  # q (k reuses), v after the in-place change, k2 (v2 reuses)
    grams = recorder.grams
    X, X2, T = x.reshape(-1, 4).double(), 2 * x.reshape(-1, 4).double(), text.reshape(-1, 6).double()
    torch.testing.assert_close(grams["k"][0], X.T @ X)
    torch.testing.assert_close(grams["v"][0], X2.T @ X2)
    torch.testing.assert_close(grams["k2"][0], T.T @ T)
    assert torch.equal(grams["k2"][0], grams["v2"][0]) and grams["v2"][1] == 21
    save_grams(tmp_path / "g.safetensors", grams)
    with safe_open(str(tmp_path / "g.safetensors"), framework="pt") as handle:
        assert sorted(handle.keys()) == ["k", "k2", "v"]  # in sorted order q duplicates k, v2 duplicates k2
        assert json.loads(handle.metadata()["aliases"]) == {"q": "k", "v2": "k2"}
    loaded = load_grams(tmp_path / "g.safetensors")
    assert sorted(loaded) == ["k", "k2", "q", "v", "v2"] and loaded["v2"][1] == 21
    for layer in loaded:
        torch.testing.assert_close(loaded[layer][0], grams[layer][0], rtol=1e-6, atol=1e-6)


def test_context_layers_take_only_the_masked_token_rows_and_the_others_every_row():
    model = SharedInputs()
    x, text = torch.randn(3, 5, 4), torch.randn(3, 7, 6)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[:, 2:4] = True  # the concept's two tokens
    mask[0, 6] = True  # rows are picked per batch item
    with GramRecorder(model, ["q", "k2", "v2"], context_layers=["k2", "v2"]) as recorder, torch.no_grad():
        recorder.context_rows = mask
        model(x.clone(), text)
    grams = recorder.grams
    T = text[mask].double()
    assert T.shape == (7, 6) and grams["k2"][1] == grams["v2"][1] == 7
    torch.testing.assert_close(grams["k2"][0], T.T @ T)
    torch.testing.assert_close(grams["v2"][0], T.T @ T)
    X = x.reshape(-1, 4).double()
    torch.testing.assert_close(grams["q"][0], X.T @ X)  # not a context layer: every row
    with GramRecorder(model, ["k2"], context_layers=["k2"]) as recorder, torch.no_grad():
        recorder.context_rows = torch.ones(2, 7, dtype=torch.bool)
        with pytest.raises(GramError, match="'k2'.*token mask is \\(2, 7\\)"):
            model(x.clone(), text)


def test_recording_names_round_trip_and_unknown_parts_are_refused():
    from lorachain.merging.fusion import is_cross_attention_kv, parse_recording, recording_name

    for source in ("images", "sampling"):
        for rows in ("all", "concept"):
            assert parse_recording(recording_name(source, rows)) == (source, rows)
    assert recording_name("images", "all") == "images" and recording_name("sampling", "concept") == "sampling-concept"
    with pytest.raises(GramError, match="source must be one of"):
        parse_recording("video")
    assert is_cross_attention_kv("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k")
    assert not is_cross_attention_kv("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k")


def test_gradient_fusion_declares_how_its_inputs_are_recorded():
    from lorachain.methods import merge_class

    fusion = merge_class("gradient_fusion")
    assert fusion.layer_input_recording({}) == "images"
    published = {"prior": "base", "inputs": "sampling", "cross_attention_rows": "concept"}
    assert fusion.layer_input_recording(published) == "sampling-concept"
    assert merge_class("weighted_average").layer_input_recording({}) is None


def test_gram_recorder_sees_peft_wrapped_layers():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 3)), LoraConfig(r=2, target_modules=["0"]))
    inner = model.base_model.model
    x = torch.randn(6, 4)
    with GramRecorder(inner, ["0"]) as recorder:
        inner(x)
    torch.testing.assert_close(recorder.grams["0"][0], x.double().T @ x.double())


# ------------------------------------------------------------------------------------------ LoRA files


def write_lora(path, adapters: dict[str, LayerAdapter], *, prefix="unet.", metadata: dict | None = None, extra=None):
    from safetensors.torch import save_file

    tensors = {}
    for layer, adapter in adapters.items():
        tensors[f"{prefix}{layer}.lora_A.weight"] = adapter.A.contiguous()
        tensors[f"{prefix}{layer}.lora_B.weight"] = adapter.B.contiguous()
    tensors.update(extra or {})
    save_file(
        tensors, str(path), metadata={"lora_adapter_metadata": json.dumps(metadata)} if metadata is not None else None
    )
    return path


def test_read_lora_round_trip_through_diffusers_save_lora_weights(tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    adapters = {layer: random_adapter(o, i, rank=4, seed=n) for n, (layer, (o, i)) in enumerate(sorted(LAYERS.items()))}
    layers = {}
    for layer, adapter in adapters.items():
        layers[f"{layer}.lora_A.weight"] = adapter.A
        layers[f"{layer}.lora_B.weight"] = adapter.B
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_out.0"]).to_dict()
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=layers, unet_lora_adapter_metadata=config)
    lora = read_lora(tmp_path / "pytorch_lora_weights.safetensors")
    assert lora.rank == 4 and lora.alpha == 8 and sorted(lora.adapters) == sorted(LAYERS)
    assert lora.metadata["lora_alpha"] == 8 and lora.metadata["r"] == 4
    for layer, adapter in adapters.items():
        assert torch.equal(lora.adapters[layer].A, adapter.A) and torch.equal(lora.adapters[layer].B, adapter.B)
        assert lora.adapters[layer].scale == 2.0
        torch.testing.assert_close(lora.delta(layer), 2.0 * adapter.B @ adapter.A)
    concept = lora.to_concept(slot=3)
    assert concept.slot == 3 and concept.name == str(tmp_path / "pytorch_lora_weights.safetensors")


def test_read_lora_prefixes_alpha_sources_and_ignored_components(tmp_path):
    adapters = {"a.to_q": random_adapter(6, 5, rank=2, seed=1), "b.to_k": random_adapter(6, 7, rank=2, seed=2)}
    plain = read_lora(write_lora(tmp_path / "plain.safetensors", adapters, prefix=""))
    assert plain.alpha == 2 and plain.adapters["a.to_q"].scale == 1.0 and any("alpha = rank" in n for n in plain.notes)
    peft_style = read_lora(
        write_lora(
            tmp_path / "peft.safetensors", adapters, prefix="base_model.model.", metadata={"r": 2, "lora_alpha": 4}
        )
    )
    assert sorted(peft_style.adapters) == ["a.to_q", "b.to_k"] and peft_style.adapters["b.to_k"].scale == 2.0
    kohya = read_lora(
        write_lora(
            tmp_path / "kohya.safetensors",
            adapters,
            extra={"unet.a.to_q.alpha": torch.tensor(1.0), "unet.b.to_k.alpha": torch.tensor(3.0)},
        )
    )
    assert kohya.alpha is None and kohya.adapters["a.to_q"].scale == 0.5 and kohya.adapters["b.to_k"].scale == 1.5
    with_text = read_lora(
        write_lora(
            tmp_path / "text.safetensors",
            adapters,
            metadata={"unet.r": 2, "unet.lora_alpha": 2, "text_encoder.r": 8, "text_encoder.lora_alpha": 99},
            extra={
                "text_encoder.layer.q_proj.lora_A.weight": torch.zeros(8, 3),
                "text_encoder.layer.q_proj.lora_B.weight": torch.zeros(3, 8),
            },
        )
    )
    assert sorted(with_text.adapters) == ["a.to_q", "b.to_k"] and with_text.alpha == 2
    assert any("ignored 2 key(s) of text_encoder" in n for n in with_text.notes)
    patterned = read_lora(
        write_lora(
            tmp_path / "pattern.safetensors",
            {**adapters, "c.to_v": random_adapter(6, 5, rank=8, seed=3)},
            metadata={
                "unet.r": 2,
                "unet.lora_alpha": 2,
                "unet.rank_pattern": {"c.to_v": 8},
                "unet.alpha_pattern": {"to_v": 16},
                "unet.use_rslora": False,
            },
        )
    )
    assert patterned.rank == 2 and patterned.alpha is None and patterned.adapters["c.to_v"].scale == 2.0
    rslora = read_lora(
        write_lora(tmp_path / "rs.safetensors", adapters, metadata={"r": 2, "lora_alpha": 4, "use_rslora": True})
    )
    assert rslora.adapters["a.to_q"].scale == pytest.approx(4 / math.sqrt(2))


def test_read_lora_errors_name_the_file_and_key(tmp_path):
    from safetensors.torch import save_file

    adapter = random_adapter(6, 5, rank=2)
    path = tmp_path / "missing_b.safetensors"
    save_file({"unet.x.to_q.lora_A.weight": adapter.A}, str(path))
    with pytest.raises(
        LoraFileError,
        match=(
            r"missing_b\.safetensors: key 'unet\.x\.to_q\.lora_A\.weight' has no matching lora_B "
            r"\(expected 'unet\.x\.to_q\.lora_B\.weight'\)"
        ),
    ):
        read_lora(path)
    path = tmp_path / "mismatch.safetensors"
    save_file({"unet.x.to_q.lora_A.weight": adapter.A, "unet.x.to_q.lora_B.weight": torch.zeros(6, 3)}, str(path))
    with pytest.raises(
        LoraFileError,
        match=(
            r"mismatch\.safetensors: key 'unet\.x\.to_q\.lora_B\.weight' has shape \(6, 3\) "
            r"but 'unet\.x\.to_q\.lora_A\.weight' has shape \(2, 5\)"
        ),
    ):
        read_lora(path)
    path = tmp_path / "empty.safetensors"
    save_file({"text_encoder.q.lora_A.weight": adapter.A, "text_encoder.q.lora_B.weight": adapter.B}, str(path))
    with pytest.raises(LoraFileError, match=r"empty\.safetensors: no U-Net LoRA keys"):
        read_lora(path)
    path = tmp_path / "dora.safetensors"
    save_file(
        {
            "unet.x.lora_A.weight": adapter.A,
            "unet.x.lora_B.weight": adapter.B,
            "unet.x.lora_magnitude_vector": torch.ones(6),
        },
        str(path),
    )
    with pytest.raises(
        LoraFileError, match=r"dora\.safetensors: key 'unet\.x\.lora_magnitude_vector' is not a LoRA factor"
    ):
        read_lora(path)
    path = write_lora(
        tmp_path / "ranks.safetensors", {"a": random_adapter(6, 5, rank=2), "b": random_adapter(6, 5, rank=3)}
    )
    with pytest.raises(
        LoraFileError, match=r"ranks\.safetensors: layer 'b' has rank 3 but layer 'a' has rank 2.*no rank_pattern"
    ):
        read_lora(path)
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LoraFileError, match=r"garbage\.safetensors: not a readable safetensors file"):
        read_lora(tmp_path / "garbage.safetensors")
    with pytest.raises(LoraFileError, match=r"nowhere\.safetensors: no such file"):
        read_lora(tmp_path / "nowhere.safetensors")


def test_check_compatible_names_both_files_and_the_layer(tmp_path):
    a = read_lora(
        write_lora(tmp_path / "sd15.safetensors", {"x.to_q": random_adapter(6, 5), "x.to_k": random_adapter(6, 5)})
    )
    b = read_lora(
        write_lora(tmp_path / "sdxl.safetensors", {"x.to_q": random_adapter(6, 5), "x.to_k": random_adapter(6, 7)})
    )
    with pytest.raises(LoraFileError, match=r"sd15\.safetensors and .*sdxl\.safetensors differ at layer 'x\.to_k'"):
        check_compatible([a, b])
    c = read_lora(
        write_lora(
            tmp_path / "r8.safetensors",
            {"x.to_q": random_adapter(6, 5, rank=8), "x.to_k": random_adapter(6, 5, rank=8)},
        )
    )
    check_compatible([a, c])
    with pytest.raises(
        LoraFileError, match=r"sd15\.safetensors and .*r8\.safetensors differ at layer 'x\.to_k': rank 4 vs 8"
    ):
        check_compatible([a, c], need_equal_rank=True)
