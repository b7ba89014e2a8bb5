"""SD3 and FLUX.1 personalization, checked against independent computations.

Every continual method, BlockLoRA and Orthogonal Adaptation train on the tiny SD3 (SD3.5-medium-
like) and FLUX.1 pipelines at 64 px, rank 4, a few steps, one thread. What each test compares with:

* chains: the methods' closed forms computed here from the tasks' LoRA files (test_chain's
  ``closed_form``), and a stock ``StableDiffusion3Pipeline`` / ``FluxPipeline`` after
  ``load_lora_weights``;
* the objective: the flow-matching loss of diffusers' train_dreambooth_lora_sd3.py / _flux.py
  written out here (logit-normal or uniform u, sigmas of the scheduler, packing, guidance);
* targets: the linear layers counted from ``named_modules``;
* sampling: a stock pipeline call on the same initial latents;
* export: a stock pipeline loading the file, the transformer class loading the fused weights.
"""

from __future__ import annotations

import math

import pytest
from safetensors.torch import load_file
from test_chain import closed_form, factors

from lorachain.methods import make_method
from lorachain.state import LORA_FILE, FoldedState, apply_to_unet, fold_state, read_manifest
from lorachain.torch_env import torch
from lorachain.train import train_task

ARCHITECTURES = ("sd3", "flux")
METHODS = ("naive", "merge_init", "ortho_init", "magmax")
RANK, ALPHA = 4, 8  # the tiny transformers' narrowest targeted layers are 32 wide
SCALE = ALPHA / RANK
TRAINING = dict(rank=RANK, lora_alpha=ALPHA, steps=3, learning_rate=5e-3, resolution=64, batch_size=1)
GUIDANCE = {"sd3": {}, "flux": {"guidance": 3.5}, "flux_schnell": {}}  # FLUX.1-dev's training guidance
PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "flux_schnell": "FluxPipeline"}
TRANSFORMERS = {
    "sd3": "SD3Transformer2DModel",
    "flux": "FluxTransformer2DModel",
    "flux_schnell": "FluxTransformer2DModel",
}
# The attention projections of both streams, by module-name suffix (what the issue documents).
PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def base_dir(request, architecture: str):
    return request.getfixturevalue(f"tiny_{architecture}_dir")


def diffusers_class(name: str):
    import diffusers

    return getattr(diffusers, name)


def train(base, architecture, tasks, index, previous, method, output_dir, *, params=None, slot=None, run=None, **extra):
    prompt, images = tasks[index - 1]
    return train_task(
        model_source=str(base),
        train_images=images,
        train_prompt=prompt,
        task_index=index,
        previous_state=None if previous is None else str(previous),
        method_name=method,
        method_params=params or {},
        training={**TRAINING, **GUIDANCE[architecture], **extra},
        seed=0,
        output_dir=output_dir,
        run=run or {"method": method, "seed": 0},
        concept=f"concept{index}",
        slot=slot,
        progress=False,
    )


def projection_names(transformer) -> set[str]:
    """The default targets counted independently: linear layers named like an attention projection."""
    return {
        name
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear)
        and (name.rsplit(".", 1)[-1] in PROJECTIONS or name.endswith(".to_out.0"))
    }


def base_transformer(base, architecture):
    return diffusers_class(TRANSFORMERS[architecture]).from_pretrained(base, subfolder="transformer")


def transformer_inputs(transformer, batch: int = 2, seed: int = 0) -> dict:
    """Fixed inputs of a 64 px image (8 x 8 latents) and a short text, with each model's conventions."""
    generator = torch.Generator().manual_seed(seed)
    config = transformer.config
    text = torch.randn(batch, 12, config.joint_attention_dim, generator=generator)
    pooled = torch.randn(batch, config.pooled_projection_dim, generator=generator)
    if type(transformer).__name__ == "SD3Transformer2DModel":
        hidden = torch.randn(batch, config.in_channels, 8, 8, generator=generator)
        timestep = torch.tensor([250.0, 700.0][:batch])  # SD3: the timestep, 0..1000
        return dict(hidden_states=hidden, encoder_hidden_states=text, pooled_projections=pooled, timestep=timestep)
    from diffusers import FluxPipeline

    inputs = dict(
        hidden_states=torch.randn(batch, 16, config.in_channels, generator=generator),  # 4 x 4 packed tokens
        encoder_hidden_states=text,
        pooled_projections=pooled,
        timestep=torch.tensor([0.25, 0.7][:batch]),  # FLUX: the sigma
        img_ids=FluxPipeline._prepare_latent_image_ids(batch, 4, 4, "cpu", torch.float32),
        txt_ids=torch.zeros(12, 3),
    )
    if config.guidance_embeds:
        inputs["guidance"] = torch.full((batch,), 3.5)
    return inputs


@torch.no_grad()
def output_of(transformer):
    return transformer(**transformer_inputs(transformer), return_dict=False)[0]


def folded_output(base, architecture, state: FoldedState):
    """lorachain's model of a state: the stock transformer with the folded delta added."""
    transformer = base_transformer(base, architecture)
    apply_to_unet(transformer, state)
    return output_of(transformer)


def stock_pipeline(base, architecture):
    return diffusers_class(PIPELINES[architecture]).from_pretrained(base)


def assert_same_model(actual, expected, base, atol=1e-5):
    assert (expected - base).abs().max() > 20 * atol  # the LoRA matters: the comparison proves something
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=atol)


# ------------------------------------------------------------------------------ two-task chains


@pytest.fixture(scope="module", params=ARCHITECTURES)
def chains(request, synthetic_tasks, tmp_path_factory):
    """Two tasks of every continual method on one architecture."""
    architecture = request.param
    base = base_dir(request, architecture)
    root = tmp_path_factory.mktemp(f"chains-{architecture}")
    dirs = {}
    for method in METHODS:
        first, second = root / method / "task1", root / method / "task2"
        train(base, architecture, synthetic_tasks, 1, None, method, first)
        train(base, architecture, synthetic_tasks, 2, first, method, second)
        dirs[method] = (first, second)
    return {"architecture": architecture, "base": base, "dirs": dirs, "root": root}


def test_two_task_chains_fold_to_each_methods_closed_form(chains):
    architecture, base = chains["architecture"], chains["base"]
    expected_layers = projection_names(base_transformer(base, architecture))
    for method, (first, second) in chains["dirs"].items():
        for directory in (first, second):
            manifest = read_manifest(directory)
            assert manifest["architecture"] == PIPELINES[architecture]
            keys = load_file(directory / LORA_FILE)
            assert keys and all(key.startswith("transformer.") for key in keys), method
            assert set(factors(directory)) == expected_layers, method
        adapters = [factors(first), factors(second)]
        state = fold_state(second, make_method(method))
        assert set(state.layers()) == expected_layers
        for layer in sorted(expected_layers):
            wanted = closed_form(method, [task[layer] for task in adapters]).float()
            torch.testing.assert_close(state.layer_delta(layer), wanted, rtol=1e-5, atol=1e-7)
        # not vacuous: both tasks trained, so the methods' formulas give different models
        assert any(not torch.equal(adapters[0][layer].B, adapters[1][layer].B) for layer in expected_layers)


def test_naive_continues_task_1s_adapter_and_magmax_differs_from_the_sum(chains, synthetic_tasks):
    """naive's task 2 starts from task 1's factors (its state is the one live adapter), and the
    magmax selection is not merge_init's sum on these deltas (the closed forms are told apart)."""
    architecture, base = chains["architecture"], chains["base"]
    first = chains["dirs"]["naive"][0]
    out = chains["root"] / "naive-init2"
    train(base, architecture, synthetic_tasks, 2, first, "naive", out, steps=0)
    initial, previous = factors(out), factors(first)
    for layer, adapter in previous.items():
        assert torch.equal(initial[layer].A, adapter.A) and torch.equal(initial[layer].B, adapter.B), layer
    state = fold_state(chains["dirs"]["magmax"][1], make_method("magmax"))
    tasks = [factors(directory) for directory in chains["dirs"]["magmax"]]
    assert any(
        not torch.allclose(state.layer_delta(layer), tasks[0][layer].delta() + tasks[1][layer].delta())
        for layer in state.layers()
    )


def test_ortho_init_starts_task_2_columnwise_orthogonal_on_every_transformer_layer(chains, synthetic_tasks):
    """ortho_init (columnwise): each column of task 2's initial A is orthogonal to the same column
    of task 1's trained A, with norm 1/sqrt(r) (the Gaussian init's), and B starts at 0, on every
    targeted layer, context-stream projections included."""
    architecture, base = chains["architecture"], chains["base"]
    first = chains["dirs"]["ortho_init"][0]
    out = chains["root"] / "ortho-init2"
    train(base, architecture, synthetic_tasks, 2, first, "ortho_init", out, steps=0)
    initial, previous = factors(out), factors(first)
    assert set(initial) == set(previous) and any(".add_k_proj" in layer for layer in initial)
    for layer, adapter in initial.items():
        A_new, A_prev = adapter.A.double(), previous[layer].A.double()
        assert (A_new * A_prev).sum(0).abs().max() < 1e-6 * A_prev.abs().max(), layer
        torch.testing.assert_close(A_new.norm(dim=0), torch.full((A_new.shape[1],), 1 / math.sqrt(RANK)).double())
        assert torch.count_nonzero(adapter.B) == 0, layer


@pytest.mark.parametrize("method", ["merge_init", "naive"])
def test_a_task_state_loads_in_a_stock_pipeline(chains, method):
    """The state file of merge_init's task 1 alone (and naive's task 2: its single live adapter)
    loads with load_lora_weights and gives lorachain's folded transformer."""
    architecture, base = chains["architecture"], chains["base"]
    directory = chains["dirs"][method][0 if method == "merge_init" else 1]
    expected = folded_output(base, architecture, fold_state(directory, make_method(method)))
    pipe = stock_pipeline(base, architecture)
    untouched = output_of(pipe.transformer)
    pipe.load_lora_weights(str(directory))
    assert_same_model(output_of(pipe.transformer), expected, untouched)
