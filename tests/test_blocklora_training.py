"""Training-side BlockLoRA and Orthogonal Adaptation: blockwise rows, output erasure, frozen
orthogonal down-projections, slot errors, in chains on the tiny SD-1.x pipeline."""

from __future__ import annotations

import pytest
from test_chain import factors, run_task

from lorachain.methods import MethodError, make_method
from lorachain.methods.blocklora import block_rows
from lorachain.methods.orthogonal_adaptation import slot_down_projection
from lorachain.models.loading import load_pipeline
from lorachain.state import apply_to_unet, fold_state
from lorachain.torch_env import torch
from lorachain.train import OutputErasure, TrainingError
from unet_inputs import unet_inputs

BLOCKS = 4


@pytest.fixture(scope="module")
def block_chain(tiny_sd1_dir, synthetic_tasks, tmp_path_factory):
    root = tmp_path_factory.mktemp("blocklora")
    params = {"num_blocks": BLOCKS, "erasure": 0.5}
    dirs, previous = [], None
    for index in (1, 2):
        directory = root / f"task{index}"
        run_task(tiny_sd1_dir, synthetic_tasks, index, previous, "blocklora", directory, params=params, steps=3)
        dirs.append(directory)
        previous = directory
    return dirs, params


def _deltas(task_dir):
    return {layer: adapter.delta() for layer, adapter in factors(task_dir).items()}


def test_each_slot_changes_only_its_row_block(block_chain):
    dirs, _ = block_chain
    for slot, directory in enumerate(dirs):
        adapters = factors(directory)
        for layer, adapter in adapters.items():
            rows = block_rows(adapter.B.shape[0], BLOCKS, slot)
            outside = torch.ones(adapter.B.shape[0], dtype=torch.bool)
            outside[rows] = False
            assert torch.count_nonzero(adapter.B[outside]) == 0, layer
            assert torch.count_nonzero(adapter.B[rows]) > 0, layer  # it trained


def test_deltas_of_different_slots_have_zero_cosine_and_no_sign_conflicts(block_chain):
    first, second = (_deltas(directory) for directory in block_chain[0])
    for layer in first:
        a, b = first[layer].flatten(), second[layer].flatten()
        assert torch.dot(a, b) == 0, layer
        both = (a != 0) & (b != 0)
        assert not both.any(), layer  # no entry where both are nonzero, so no sign can conflict


def test_erasure_is_off_at_inference(block_chain, tiny_sd1_dir):
    directory = block_chain[0][-1]
    pipe = load_pipeline(str(tiny_sd1_dir))
    apply_to_unet(pipe.unet, fold_state(directory, make_method("blocklora", block_chain[1])))
    pipe.unet.eval()
    inputs = unet_inputs(pipe.unet)
    with torch.no_grad():
        first, second = pipe.unet(**inputs).sample, pipe.unet(**inputs).sample
    assert torch.equal(first, second)


def test_erasure_draws_a_fresh_mask_every_step_and_the_same_on_recomputation():
    layer = torch.nn.Linear(8, 64)

    class Holder(torch.nn.Module):  # the module layout peft gives a LoRA layer
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Module()
            self.proj.out_features = 64
            self.proj.lora_B = torch.nn.ModuleDict({"default": layer})

    erasure = OutputErasure(Holder(), ["proj"], rate=0.5, seed=3, device="cpu")
    x = torch.randn(2, 8)
    erasure.begin_step(0)
    step0, again = layer(x), layer(x)
    erasure.begin_step(1)
    step1 = layer(x)
    assert torch.equal(step0, again)  # gradient checkpointing recomputes with the same mask
    assert not torch.equal(step0, step1)
    kept = erasure.masks["proj"]
    assert set(kept.unique().tolist()) <= {0.0, 1.0} and 10 < kept.sum() < 54
    erasure.remove()
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_erasure_changes_training(tiny_sd1_dir, synthetic_tasks, tmp_path, block_chain):
    run_task(
        tiny_sd1_dir,
        synthetic_tasks,
        1,
        None,
        "blocklora",
        tmp_path / "plain",
        params={"num_blocks": BLOCKS, "erasure": 0.0},
        steps=3,
    )
    erased, plain = factors(block_chain[0][0]), factors(tmp_path / "plain")
    assert any(not torch.equal(erased[layer].B, plain[layer].B) for layer in plain)


def test_erasure_rates_per_concept_slot():

    method = make_method("blocklora", {"num_blocks": 4, "erasure": [0.0, 0.5, 0.25]})
    assert [method.erasure_rate(slot) for slot in range(3)] == [0.0, 0.5, 0.25]
    assert make_method("blocklora", {"erasure": 0.3}).erasure_rate(7) == 0.3
    with pytest.raises(MethodError, match="4 concepts need 4 erasure rates but the erasure list has 3"):
        method.check_slots(4, "modular.adapters.b.num_blocks")
    with pytest.raises(MethodError, match="erasure"):
        make_method("blocklora", {"erasure": [0.5, 1.0]})  # lambda = 1 erases every output


def test_per_concept_erasure_changes_only_that_concepts_training(tiny_sd1_dir, synthetic_tasks, tmp_path, block_chain):
    # slot 0 with lambda_0 = 0 trains exactly as the plain erasure 0 run: the list is read by slot
    params = {"num_blocks": BLOCKS, "erasure": [0.0, 0.5]}
    run_task(tiny_sd1_dir, synthetic_tasks, 1, None, "blocklora", tmp_path / "listed", params=params, steps=3)
    plain = {"num_blocks": BLOCKS, "erasure": 0.0}
    run_task(tiny_sd1_dir, synthetic_tasks, 1, None, "blocklora", tmp_path / "plain", params=plain, steps=3)
    listed, zero = factors(tmp_path / "listed"), factors(tmp_path / "plain")
    assert all(torch.equal(listed[layer].B, zero[layer].B) for layer in zero)


def test_more_concepts_than_blocks_fails_before_training(tiny_sd1_dir, synthetic_tasks, block_chain, tmp_path):
    with pytest.raises(MethodError, match="2 concepts need 2 row blocks but num_blocks is 1"):
        run_task(
            tiny_sd1_dir,
            synthetic_tasks,
            2,
            block_chain[0][0],
            "blocklora",
            tmp_path / "t2",
            params={"num_blocks": 1, "erasure": 0.5},
            steps=1,
        )


def test_blockwise_off_is_a_plain_lora(tiny_sd1_dir, synthetic_tasks, tmp_path):
    run_task(
        tiny_sd1_dir,
        synthetic_tasks,
        1,
        None,
        "blocklora",
        tmp_path / "t1",
        params={"blockwise": False, "erasure": 0.0},
        steps=2,
    )
    assert all(torch.count_nonzero(adapter.B) == adapter.B.numel() for adapter in factors(tmp_path / "t1").values())


def test_orthogonal_adaptation_freezes_orthogonal_down_projections(tiny_sd1_dir, synthetic_tasks, tmp_path):
    previous = None
    trained = []
    for index in (1, 2):
        run_task(
            tiny_sd1_dir, synthetic_tasks, index, previous, "orthogonal_adaptation", tmp_path / f"t{index}", steps=3
        )
        previous = tmp_path / f"t{index}"
        trained.append(factors(previous))
    for layer, adapter in trained[0].items():
        rank, width = adapter.A.shape
        for slot in (0, 1):
            assert torch.equal(trained[slot][layer].A, slot_down_projection(width, rank, slot, 0)), layer  # frozen
            assert torch.count_nonzero(trained[slot][layer].B) > 0
        assert torch.allclose(trained[0][layer].A @ trained[1][layer].A.T, torch.zeros(rank, rank), atol=1e-6)


def test_orthogonal_adaptation_slot_beyond_the_basis_is_an_error(tiny_sd1_dir, synthetic_tasks, tmp_path):
    from test_chain import TRAINING

    from lorachain.train import train_task

    prompt, images = synthetic_tasks[0]
    with pytest.raises((MethodError, TrainingError), match="concept slots"):
        train_task(
            model_source=str(tiny_sd1_dir),
            train_images=images,
            train_prompt=prompt,
            task_index=1,
            previous_state=None,
            method_name="orthogonal_adaptation",
            method_params={"columns": "coordinated"},
            training={**TRAINING, "steps": 1},
            seed=0,
            output_dir=tmp_path / "far",
            progress=False,
            slot=10_000,
        )


def test_random_columns_are_seeded_orthonormal_and_fit_any_number_of_concepts():
    from lorachain.methods.orthogonal_adaptation import max_slots, random_down_projection

    width, rank = 16, 4
    beyond = max_slots(width, rank) + 3  # a slot the coordinated blocks cannot hold
    A = random_down_projection(width, rank, beyond, 0)
    assert A.shape == (rank, width) and torch.allclose(A @ A.T, torch.eye(rank), atol=1e-6)
    assert torch.equal(A, random_down_projection(width, rank, beyond, 0))  # seeded
    assert not torch.equal(A, random_down_projection(width, rank, beyond + 1, 0))  # its own columns per slot
    with pytest.raises(ValueError, match="slot 7 with rank 4 needs columns"):
        slot_down_projection(width, rank, beyond, 0)


def test_uncoordinated_orthogonal_adaptation_trains_and_merges_past_the_coordinated_limit(
    tiny_sd1_dir, synthetic_tasks, tmp_path
):
    from test_chain import TRAINING

    from lorachain.methods import make_merge
    from lorachain.modular import load_concept
    from lorachain.train import train_task

    prompt, images = synthetic_tasks[0]
    dirs = []
    for slot in (0, 10_000):  # slot 10000 is far past in_features // rank on every layer
        dirs.append(tmp_path / f"slot{slot}")
        train_task(
            model_source=str(tiny_sd1_dir),
            train_images=images,
            train_prompt=prompt,
            task_index=1,
            previous_state=None,
            method_name="orthogonal_adaptation",
            method_params={"columns": "random"},
            training={**TRAINING, "steps": 2},
            seed=slot,
            output_dir=dirs[-1],
            progress=False,
            slot=slot,
        )
    concepts = [load_concept(directory)[0] for directory in dirs]
    merged = make_merge("orthogonal_adaptation", {"weights": 1.0}).merge(concepts)
    for layer, delta in merged.items():
        expected = sum(
            concept.adapters[layer].scale * concept.adapters[layer].B @ concept.adapters[layer].A
            for concept in concepts
        )
        torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-6)
    far = concepts[1].adapters[next(iter(merged))]
    assert torch.count_nonzero(far.B) > 0


def test_auto_columns_are_coordinated_where_the_slot_fits_and_random_beyond():
    from lorachain.methods.orthogonal_adaptation import auto_down_projection, random_down_projection

    width, rank = 16, 4
    for slot in range(4):  # 4 x 4 = 16 columns: every one of these fits
        assert torch.equal(auto_down_projection(width, rank, slot, 0), slot_down_projection(width, rank, slot, 0))
    assert torch.equal(auto_down_projection(width, rank, 4, 0), random_down_projection(width, rank, 4, 0))
