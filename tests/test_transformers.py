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

import io
import math
import re

import numpy as np
import pytest
from safetensors.torch import load_file
from test_chain import closed_form, factors

from lorachain.methods import make_merge, make_method
from lorachain.models.denoisers import TRANSFORMER_TARGETS, DenoiserError, denoiser
from lorachain.models.loading import load_pipeline
from lorachain.state import LORA_FILE, FoldedState, apply_to_unet, fold_state, read_manifest
from lorachain.torch_env import torch
from lorachain.train import TrainingError, train_task
from lorachain.training.adapters import lora_layers

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


# ------------------------------------------------------------------------------ the flow-matching objective

PROMPT = "a photo of sks backpack"


def task_spec(base, images, tmp_path):
    from lorachain.train import TaskSpec

    return TaskSpec(
        model_source=str(base),
        vae=None,
        train_images=list(images),
        train_prompt=PROMPT,
        task_index=1,
        previous_state=None,
        seed=0,
        this_seed=1,
        slot=0,
        concept="backpack",
        run={},
        output_dir=tmp_path,
    )


def prepared(base, images, tmp_path, **training):
    """The trainer's objects for task 1 (model, data), built by its own phases (as
    test_training_options' ``prepared``, on the pipeline's denoiser)."""
    from lorachain.train import (
        TrainingConfig,
        _accelerator,
        _encode_training_data,
        _load_model,
        _prepare_unet,
        _set_up_adapter,
    )

    config = TrainingConfig.from_dict({**TRAINING, **training})
    task = task_spec(base, images, tmp_path)
    method = make_method("merge_init")
    accelerator = _accelerator(config)
    pipe, config, layers, crops = _load_model(task, config, method, "methods.merge_init")
    adapters, masks = _set_up_adapter(denoiser(pipe), method, layers, task, config)
    data = _encode_training_data(pipe, crops, task, config, accelerator.device)
    model = _prepare_unet(denoiser(pipe), adapters, masks, layers, method, task, config, accelerator)
    with torch.no_grad():  # B = 0 at init: give the LoRA a nonzero delta
        for _, parameter in model.named_trainable:
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(7)))
    return config, data, model, pipe


def direct_flow_matching_loss(pipe, base, data, transformer, generator, batch, weighting, guidance):
    """One batch's loss as diffusers' train_dreambooth_lora_sd3.py / _flux.py compute it, with the
    trainer's draw order (image indices, posterior noise, noise, then u)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    indices = torch.randint(0, data.count, (batch,), generator=generator)
    mean, std = data.latent_mean[indices], data.latent_std[indices]
    eps = torch.randn(mean.shape, generator=generator)
    noise = torch.randn(mean.shape, generator=generator)
    if weighting == "logit_normal":  # compute_density_for_timestep_sampling, logit_mean 0, logit_std 1
        u = torch.sigmoid(torch.normal(mean=0.0, std=1.0, size=(batch,), generator=generator))
    else:
        u = torch.rand(size=(batch,), generator=generator)
    vae = pipe.vae.config
    latents = (mean + std * eps - vae.shift_factor) * vae.scaling_factor
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler")
    index = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[index]
    sigmas = scheduler.sigmas[index].view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    target = noise - latents
    if type(pipe).__name__ == "StableDiffusion3Pipeline":
        embeds, _, pooled, _ = pipe.encode_prompt(
            PROMPT, None, None, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        prediction = transformer(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=embeds.expand(batch, -1, -1),
            pooled_projections=pooled.expand(batch, -1),
            return_dict=False,
        )[0]
    else:
        embeds, pooled, text_ids = pipe.encode_prompt(PROMPT, None, device="cpu", num_images_per_prompt=1)
        _, channels, height, width = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, "cpu", torch.float32)
        packed_prediction = transformer(
            hidden_states=packed,
            timestep=timesteps / 1000,
            guidance=None if guidance is None else torch.full((batch,), float(guidance)),
            pooled_projections=pooled.expand(batch, -1),
            encoder_hidden_states=embeds.expand(batch, -1, -1),
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        pixels = height * pipe.vae_scale_factor
        prediction = FluxPipeline._unpack_latents(packed_prediction, pixels, pixels, pipe.vae_scale_factor)
    weights = sigmas**-2.0 if weighting == "sigma_sqrt" else torch.ones_like(sigmas)
    return torch.mean((weights * (prediction - target) ** 2).reshape(batch, -1), 1).mean()


@pytest.mark.parametrize(
    ("architecture", "weighting"),
    [
        ("sd3", "logit_normal"),
        ("sd3", "sigma_sqrt"),
        ("flux", "logit_normal"),
        ("flux", "sigma_sqrt"),
        ("flux_schnell", "logit_normal"),
    ],
)
def test_one_steps_loss_is_diffusers_flow_matching_loss(architecture, weighting, request, synthetic_images, tmp_path):
    from lorachain.train import _step_loss

    base = base_dir(request, architecture)
    options = {"batch_size": 2, "flow_matching": {"weighting_scheme": weighting}, **GUIDANCE[architecture]}
    config, data, model, pipe = prepared(base, synthetic_images, tmp_path, **options)
    with torch.no_grad():
        trainer = _step_loss(0, data, model, torch.Generator().manual_seed(5), config)
        guidance = config.guidance
        direct = direct_flow_matching_loss(
            pipe, base, data, model.unet, torch.Generator().manual_seed(5), 2, weighting, guidance
        )
        assert trainer.item() == pytest.approx(direct.item(), rel=1e-5)
        other_draws = direct_flow_matching_loss(
            pipe, base, data, model.unet, torch.Generator().manual_seed(6), 2, weighting, guidance
        )
        assert other_draws.item() != pytest.approx(direct.item(), rel=1e-3)  # the draws matter
        if architecture == "flux":  # FLUX.1-dev's guidance embedding is what training.guidance sets
            unguided = direct_flow_matching_loss(
                pipe, base, data, model.unet, torch.Generator().manual_seed(5), 2, weighting, 1.0
            )
            assert unguided.item() != pytest.approx(direct.item(), rel=1e-4)


def test_flux_schnell_trains_without_guidance(tiny_flux_schnell_dir, synthetic_tasks, tmp_path):
    manifest = train(tiny_flux_schnell_dir, "flux_schnell", synthetic_tasks, 1, None, "merge_init", tmp_path / "t")
    assert math.isfinite(manifest["final_loss"]) and "guidance" not in manifest
    assert manifest["flow_matching"]["weighting_scheme"] == "logit_normal"
    assert read_manifest(tmp_path / "t")["architecture"] == "FluxPipeline"


# ------------------------------------------------------------------------------ targets by pattern


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_default_targets_are_the_attention_projections_of_every_block(architecture, request):
    transformer = base_transformer(base_dir(request, architecture), architecture)
    expected = projection_names(transformer)
    assert set(lora_layers(transformer, TRANSFORMER_TARGETS)) == expected
    if architecture == "sd3":  # SD3.5's second (self-)attention of its dual-attention layers
        assert {name for name in expected if ".attn2." in name} == {
            f"transformer_blocks.0.attn2.{suffix}" for suffix in ("to_q", "to_k", "to_v", "to_out.0")
        }
        assert len(expected) == 3 * 8 - 1 + 4  # the last block (context_pre_only) has no to_add_out
    else:  # FLUX: the joint blocks' both streams, the single blocks' to_q / to_k / to_v
        singles = {name for name in expected if name.startswith("single_transformer_blocks.")}
        projections = ("to_q", "to_k", "to_v")
        assert singles == {f"single_transformer_blocks.{i}.attn.{p}" for i in range(2) for p in projections}
        assert len(expected) == 8 + 6
    assert any(name.endswith("attn.add_v_proj") for name in expected)


REGEX = {
    "sd3": r"transformer_blocks\.\d+\.attn2\.to_(q|k)",
    "flux": r"single_transformer_blocks\.\d+\.attn\.to_(q|v)",
}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_regex_target_trains_exactly_the_layers_it_matches(architecture, request, synthetic_tasks, tmp_path):
    base = base_dir(request, architecture)
    transformer = base_transformer(base, architecture)
    pattern = REGEX[architecture]
    expected = {name for name, _ in transformer.named_modules() if re.fullmatch(pattern, name)}
    assert 2 <= len(expected) < 10
    train(base, architecture, synthetic_tasks, 1, None, "merge_init", tmp_path / "t", target_modules=pattern)
    assert set(factors(tmp_path / "t")) == expected and read_manifest(tmp_path / "t")["layers"] == len(expected)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_target_that_matches_nothing_names_the_key_and_near_names(architecture, request, synthetic_tasks, tmp_path):
    base = base_dir(request, architecture)
    transformer = base_transformer(base, architecture)
    with pytest.raises(TrainingError, match=r"training\.target_modules.*nearest linear layer names: .*add_q_proj"):
        lora_layers(transformer, ["to_q", "add_qproj"])
    with pytest.raises(TrainingError, match=r"training\.target_modules.*nearest linear layer names: .*to_q"):
        lora_layers(transformer, r"blocks\.\d+\.attn\.to_qq")
    with pytest.raises(TrainingError, match=r"training\.target_modules.*'q_proj'"):
        train(base, architecture, synthetic_tasks, 1, None, "merge_init", tmp_path / "t", target_modules=["q_proj"])
    assert not (tmp_path / "t" / LORA_FILE).exists()


# ------------------------------------------------------------------------------ BlockLoRA, Orthogonal Adaptation

BLOCKS = 4
MODULAR = {
    "blocklora": {"num_blocks": BLOCKS, "erasure": 0.25},
    "orthogonal_adaptation": {"columns": "coordinated", "basis_seed": 3},
}


@pytest.fixture(scope="module", params=ARCHITECTURES)
def concepts(request, synthetic_tasks, tmp_path_factory):
    """Two concepts per method trained independently (modular regime, slots 0 and 1)."""
    architecture = request.param
    base = base_dir(request, architecture)
    root = tmp_path_factory.mktemp(f"modular-{architecture}")
    dirs = {}
    for method, params in MODULAR.items():
        dirs[method] = []
        for slot in (0, 1):
            directory = root / method / f"concept{slot + 1}"
            run = {"regime": "modular", "method": method, "seed": 0}
            train(base, architecture, synthetic_tasks, 1, None, method, directory, params=params, slot=slot, run=run)
            dirs[method].append(directory)
    return {"architecture": architecture, "base": base, "dirs": dirs}


def dead_layers(architecture: str) -> set[str]:
    """SD3's last block is context_pre_only: its context queries cannot change the output, so
    their LoRA gets no gradient (as in SD3.5; test_tiny_transformers checks it with peft alone)."""
    return {"transformer_blocks.2.attn.add_q_proj"} if architecture == "sd3" else set()


def test_blocklora_changes_only_each_concepts_row_block_on_every_transformer_layer(concepts):
    from lorachain.methods.blocklora import block_rows

    expected = projection_names(base_transformer(concepts["base"], concepts["architecture"]))
    for slot, directory in enumerate(concepts["dirs"]["blocklora"]):
        adapters = factors(directory)
        assert set(adapters) == expected and read_manifest(directory)["slot"] == slot
        for layer, adapter in adapters.items():
            out_features = adapter.B.shape[0]
            rows = torch.arange(out_features)
            block = rows[block_rows(out_features, BLOCKS, slot)]
            outside = ~torch.isin(rows, block)
            assert torch.count_nonzero(adapter.B[outside]) == 0, layer
            if layer not in dead_layers(concepts["architecture"]):
                assert torch.count_nonzero(adapter.B[block]) > 0, layer  # it trained
            assert block.numel() == out_features // BLOCKS  # every tiny width is a multiple of 4


def test_orthogonal_adaptation_freezes_each_concepts_basis_rows(concepts):
    """A_i are the slot's rows of one orthogonal basis per input width: orthonormal, mutually
    orthogonal, the same for every layer of that width and untouched by training."""
    from lorachain.methods.orthogonal_adaptation import orthogonal_basis

    first, second = (factors(directory) for directory in concepts["dirs"]["orthogonal_adaptation"])
    for layer in first:
        A1, A2 = first[layer].A.double(), second[layer].A.double()
        width = A1.shape[1]
        eye = torch.eye(RANK, dtype=torch.float64)
        torch.testing.assert_close(A1 @ A1.T, eye, rtol=0, atol=1e-6)
        torch.testing.assert_close(A2 @ A2.T, eye, rtol=0, atol=1e-6)
        assert (A1 @ A2.T).abs().max() < 1e-6, layer
        basis = orthogonal_basis(width, MODULAR["orthogonal_adaptation"]["basis_seed"])
        torch.testing.assert_close(A1, basis[:, :RANK].T, rtol=0, atol=1e-7)
        torch.testing.assert_close(A2, basis[:, RANK : 2 * RANK].T, rtol=0, atol=1e-7)
        if layer not in dead_layers(concepts["architecture"]):
            assert torch.count_nonzero(first[layer].B) > 0, layer


@pytest.mark.parametrize(("method", "weight"), [("blocklora", 1.0), ("orthogonal_adaptation", 0.6)])
def test_the_merge_of_two_transformer_concepts_is_the_weighted_sum(concepts, method, weight):
    """The merges' defaults: BlockLoRA alpha_i = 1, Orthogonal Adaptation lambda_i = 0.6; the merged
    transformer is the base plus that sum, and differs from each concept alone."""
    from lorachain.modular import load_concept

    dirs = concepts["dirs"][method]
    merged = make_merge(method, {}).merge([load_concept(directory)[0] for directory in dirs])
    tasks = [factors(directory) for directory in dirs]
    assert set(merged) == set(tasks[0])
    for layer, delta in merged.items():
        wanted = sum(weight * SCALE * (task[layer].B.double() @ task[layer].A.double()) for task in tasks)
        torch.testing.assert_close(delta.double(), wanted, rtol=1e-5, atol=1e-8)
    base, architecture = concepts["base"], concepts["architecture"]
    together = folded_output(base, architecture, FoldedState(tasks_done=2, merged=merged))
    alone = folded_output(base, architecture, fold_state(dirs[0], make_method(method, MODULAR[method])))
    assert not torch.allclose(together, alone, atol=1e-4)


# ------------------------------------------------------------------------------ sampling

SAMPLING = {"num_samples": 2, "steps": 2, "resolution": 64, "guidance_scale": 3.5, "batch_size": 2, "noise_seed": 42}
SAMPLE_PROMPT = "a photo of sks backpack on a beach"


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_sampling_pairs_noises_and_the_base_model_is_the_stock_pipeline(architecture, request):
    from lorachain.sample import SamplingConfig, load_model_for_sampling, render_prompts

    base = base_dir(request, architecture)
    config = SamplingConfig.from_dict(SAMPLING)
    pipe = load_model_for_sampling(str(base), None, None, None, None)
    jobs = [(SAMPLE_PROMPT, 0), (SAMPLE_PROMPT, 1), (SAMPLE_PROMPT, 0), ("a photo of a teapot", 0)]
    images = [png_bytes(image) for image in render_prompts(pipe, jobs, config)]
    again = [png_bytes(image) for image in render_prompts(pipe, jobs, config)]
    assert images == again  # byte-identical across runs
    assert images[0] == images[2]  # the same noise index (in another batch) gives the same image
    assert images[0] != images[1] and images[0] != images[3]  # another noise, another prompt
    # the stock pipeline, called here on the paired noises drawn here (FLUX: packed into tokens)
    stock = stock_pipeline(base, architecture)
    noises = torch.randn((2, 16, 8, 8), generator=torch.Generator().manual_seed(SAMPLING["noise_seed"]))
    if architecture == "flux":
        noises = stock._pack_latents(noises, 2, 16, 8, 8)
    expected = stock(
        prompt=[SAMPLE_PROMPT, SAMPLE_PROMPT],
        latents=noises,
        num_inference_steps=SAMPLING["steps"],
        guidance_scale=SAMPLING["guidance_scale"],
        height=64,
        width=64,
        output_type="pil",
    ).images
    assert [png_bytes(image) for image in expected] == images[:2]


def test_a_state_samples_as_the_stock_pipeline_with_its_lora(chains):
    """A state's sampler is the base pipeline with the folded transformer: the same images as a
    stock pipeline that loads the state's LoRA file (merge_init, task 1), unlike the base's."""
    from lorachain.sample import SamplingConfig, load_model_for_sampling, render_prompts

    architecture, base = chains["architecture"], chains["base"]
    directory = chains["dirs"]["merge_init"][0]
    config = SamplingConfig.from_dict({**SAMPLING, "num_samples": 1, "batch_size": 1})
    pipe = load_model_for_sampling(str(base), None, directory, "merge_init", {})
    (ours,) = render_prompts(pipe, [(SAMPLE_PROMPT, 0)], config)
    stock = stock_pipeline(base, architecture)
    latents = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(SAMPLING["noise_seed"]))
    if architecture == "flux":
        latents = stock._pack_latents(latents, 1, 16, 8, 8)
    call = dict(prompt=SAMPLE_PROMPT, num_inference_steps=2, guidance_scale=3.5, height=64, width=64, output_type="np")
    untouched = stock(latents=latents, **call).images[0]
    stock.load_lora_weights(str(directory))
    loaded = stock(latents=latents, **call).images[0]
    ours = np.asarray(ours).astype(np.float64) / 255
    assert np.abs(ours - loaded).max() <= 1 / 255 + 1e-6  # PNG rounding of the same image
    assert np.abs(loaded - untouched).max() > 3 / 255  # the LoRA shows


def test_flux_refuses_fp16_sampling(tiny_flux_dir):
    from lorachain.sample import SamplingError, load_model_for_sampling

    with pytest.raises(SamplingError, match=r"sampling\.precision.*bf16"):
        load_model_for_sampling(str(tiny_flux_dir), None, None, None, None, precision="fp16")


# ------------------------------------------------------------------------------ export


def test_an_exact_export_loads_in_the_stock_pipeline_and_as_a_fused_transformer(chains, tmp_path):
    from lorachain.export import DIFFUSERS_FILE, export_state

    architecture, base = chains["architecture"], chains["base"]
    last = chains["dirs"]["merge_init"][1]
    record = export_state(last, tmp_path / "out", formats=("diffusers", "transformer"))
    assert record["exact"] and record["rank"] == {"min": 2 * RANK, "max": 2 * RANK}
    tensors = load_file(tmp_path / "out" / DIFFUSERS_FILE)
    assert tensors and all(key.startswith("transformer.") for key in tensors)
    state = fold_state(last, make_method("merge_init"))
    expected = folded_output(base, architecture, state)
    pipe = stock_pipeline(base, architecture)
    untouched = output_of(pipe.transformer)
    pipe.load_lora_weights(str(tmp_path / "out"))
    assert_same_model(output_of(pipe.transformer), expected, untouched)
    fused = diffusers_class(TRANSFORMERS[architecture]).from_pretrained(tmp_path / "out", subfolder="transformer")
    reference = base_transformer(base, architecture)
    apply_to_unet(reference, state)
    wanted = reference.state_dict()
    assert fused.state_dict().keys() == wanted.keys()
    for name, tensor in fused.state_dict().items():
        assert torch.equal(tensor, wanted[name]), name


def test_an_svd_export_of_magmax_loads_and_stays_within_its_recorded_error(chains, tmp_path):
    from lorachain.export import DIFFUSERS_FILE, SvdSettings, export_state

    architecture, base = chains["architecture"], chains["base"]
    last = chains["dirs"]["magmax"][1]
    record = export_state(last, tmp_path / "out", formats=("diffusers",), svd=SvdSettings(rank=RANK))
    assert not record["exact"] and record["rank"] == {"min": RANK, "max": RANK}
    state = fold_state(last, make_method("magmax"))
    tensors = load_file(tmp_path / "out" / DIFFUSERS_FILE)
    low_rank, residual, total = {}, 0.0, 0.0
    for layer in state.layers():
        A = tensors[f"transformer.{layer}.lora_A.weight"].double()
        B = tensors[f"transformer.{layer}.lora_B.weight"].double()
        low_rank[layer] = (B @ A).float()
        residual += float(torch.linalg.norm(state.layer_delta(layer).double() - B @ A)) ** 2
        total += float(torch.linalg.norm(state.layer_delta(layer).double())) ** 2
    error = math.sqrt(residual / total)
    assert record["relative_error"] == pytest.approx(error, rel=1e-4) and error > 1e-3
    pipe = stock_pipeline(base, architecture)
    untouched = output_of(pipe.transformer)
    pipe.load_lora_weights(str(tmp_path / "out"))
    loaded = output_of(pipe.transformer)
    assert_same_model(loaded, folded_output(base, architecture, FoldedState(tasks_done=2, merged=low_rank)), untouched)
    # against the exact fold: off by about the recorded relative error of the delta's effect
    exact = folded_output(base, architecture, state)
    effect = float(torch.linalg.norm(exact - untouched))
    assert 0 < float(torch.linalg.norm(loaded - exact)) <= 2 * error * effect


def test_transformer_export_formats(chains, tmp_path):
    from lorachain.export import DIFFUSERS_FILE, KOHYA_FILE, ExportError, export_state

    last = chains["dirs"]["merge_init"][1]
    record = export_state(last, tmp_path / "default")
    assert set(record["files"]) == {DIFFUSERS_FILE} and not (tmp_path / "default" / KOHYA_FILE).exists()
    with pytest.raises(ExportError, match=r"export\.formats: kohya .*diffusers format"):
        export_state(last, tmp_path / "kohya", formats=("diffusers", "kohya"))
    with pytest.raises(ExportError, match=r"export\.formats: .* has no U-Net; use 'transformer'"):
        export_state(last, tmp_path / "unet", formats=("unet",))
    assert not (tmp_path / "kohya").exists() and not (tmp_path / "unet").exists()


# ------------------------------------------------------------------------------ bad input


def test_flux_refuses_fp16_training_before_training(tiny_flux_dir, synthetic_images, tmp_path):
    """The family check (DenoiserError, run where the model is loaded, before any step) refuses
    fp16 on FLUX; on a machine without CUDA train_task stops earlier still, at the accelerator,
    naming the same key."""
    from lorachain.train import TrainingConfig, _load_model

    config = TrainingConfig.from_dict({**TRAINING, "mixed_precision": "fp16", "guidance": 3.5})
    task = task_spec(tiny_flux_dir, synthetic_images, tmp_path / "p")
    with pytest.raises(DenoiserError, match=r"training\.mixed_precision: fp16 .*bf16"):
        _load_model(task, config, make_method("merge_init"), "methods.merge_init")
    error = DenoiserError if torch.cuda.is_available() else TrainingError
    tasks = [("a photo of sks backpack", synthetic_images)]
    with pytest.raises(error, match=r"training\.mixed_precision"):
        train(tiny_flux_dir, "flux", tasks, 1, None, "merge_init", tmp_path / "t", mixed_precision="fp16")
    assert not (tmp_path / "t" / LORA_FILE).exists()


@pytest.mark.parametrize(
    ("architecture", "guidance", "message"),
    [
        ("flux", None, r"training\.guidance: this FLUX model is guidance-distilled.*set training\.guidance"),
        ("flux_schnell", 3.5, r"training\.guidance: 3\.5 is set, but this model has no guidance embedding.*remove"),
        ("sd3", 3.5, r"training\.guidance: 3\.5 is set, but this model has no guidance embedding.*remove"),
    ],
)
def test_a_guidance_mismatch_is_refused_naming_the_key(
    architecture, guidance, message, request, synthetic_tasks, tmp_path
):
    base = base_dir(request, architecture)
    extra = {} if guidance is None else {"guidance": guidance}
    with pytest.raises(DenoiserError, match=message):
        train_task(
            model_source=str(base),
            train_images=synthetic_tasks[0][1],
            train_prompt=synthetic_tasks[0][0],
            task_index=1,
            previous_state=None,
            method_name="merge_init",
            method_params={},
            training={**TRAINING, **extra},
            seed=0,
            output_dir=tmp_path / "t",
            progress=False,
        )
    assert not (tmp_path / "t" / LORA_FILE).exists()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_embedding_tuning_is_refused_on_a_transformer_naming_the_method_key(
    architecture, request, synthetic_tasks, tmp_path
):
    prompt, images = synthetic_tasks[0]
    with pytest.raises(DenoiserError, match=r"config key methods\.ed_naive\.embeddings: .*remove the embeddings block"):
        train_task(
            model_source=str(base_dir(request, architecture)),
            train_images=images,
            train_prompt=prompt,
            task_index=1,
            previous_state=None,
            method_name="naive",
            method_params={"embeddings": {"tokens": 1}},
            training={**TRAINING, **GUIDANCE[architecture]},
            seed=0,
            output_dir=tmp_path / "t",
            run={"method": "ed_naive"},
            concept_phrase="sks",
            init_words="backpack",
            progress=False,
        )
    assert not (tmp_path / "t" / LORA_FILE).exists()


def test_gradient_fusions_concept_rows_are_refused_on_a_transformer(concepts, synthetic_tasks, tmp_path):
    from lorachain.data.selection import Task
    from lorachain.modular import ModularError, record_layer_inputs

    prompt, images = synthetic_tasks[0]
    task = Task(
        concept="concept1",
        kind="object",
        token="sks",
        class_name="backpack",
        train_prompt=prompt,
        train_images=tuple(images),
        eval_prompts=(prompt,),
        reference_images=tuple(images[:1]),
    )
    with pytest.raises(ModularError, match=r"joint attention.*rows: all"):
        record_layer_inputs(
            model_source=str(concepts["base"]),
            vae=None,
            state_dir=concepts["dirs"]["blocklora"][0],
            method_name="blocklora",
            method_params=MODULAR["blocklora"],
            task=task,
            target_modules=None,
            resolution=64,
            timesteps=2,
            seed=0,
            output=tmp_path / "grams.safetensors",
            recording="images-concept",
        )
    assert not (tmp_path / "grams.safetensors").exists()


def test_the_dry_run_checks_the_denoiser_from_config_files(tiny_flux_dir, tiny_sd3_dir):
    from lorachain.config_checks import denoiser_problems

    def problems(model, **blocks):
        return "\n".join(denoiser_problems({"model": model, **blocks}))

    flux = problems({"tiny": "flux"}, training={"mixed_precision": "fp16"}, sampling={"precision": "fp16"})
    assert "training.mixed_precision: fp16" in flux and "sampling.precision: fp16" in flux
    assert "training.guidance: this FLUX model is guidance-distilled" in flux
    # a local FLUX.1-dev directory is read from its model_index.json and transformer config
    assert problems({"pretrained": str(tiny_flux_dir)}, training={}) == problems({"tiny": "flux"}, training={})
    assert problems({"pretrained": str(tiny_flux_dir)}, training={"guidance": 3.5, "mixed_precision": "bf16"}) == ""
    assert "training.guidance: 3.5 is set" in problems({"tiny": "flux_schnell"}, training={"guidance": 3.5})
    sd3 = problems({"pretrained": str(tiny_sd3_dir)}, training={"guidance": 1.0}, export={"formats": ["kohya", "unet"]})
    assert "training.guidance: 1.0 is set" in sd3 and "export.formats: ['kohya', 'unet'] cannot be written" in sd3
    embeddings = problems({"tiny": "sd3"}, methods={"ed_naive": {"embeddings": {"tokens": 1}}, "plain": {}})
    assert "methods.ed_naive.embeddings" in embeddings and "methods.plain" not in embeddings
    modular = problems({"tiny": "flux_schnell"}, modular={"adapters": {"ed": {"embeddings": {"tokens": 1}}}})
    assert "modular.adapters.ed.embeddings" in modular
    off = {"methods": {"naive": {"embeddings": None}}, "modular": {"adapters": {"b": {"embeddings": None}}}}
    assert problems({"tiny": "flux_schnell"}, **off) == ""  # null: embedding tuning off, as make_method reads it
    assert problems({"tiny": "sd1"}, training={"mixed_precision": "fp16"}, export={"formats": ["kohya"]}) == ""
    assert "export.formats: ['transformer']" in problems({"tiny": "sdxl"}, export={"formats": ["transformer"]})


@pytest.mark.parametrize("recording", ["images", "sampling"])
def test_layer_inputs_are_recorded_on_every_transformer_layer(concepts, synthetic_tasks, tmp_path, recording):
    """Gradient fusion's recorder (rows: all) on a transformer: a Gram per default target, of the
    rows each layer sees per forward (image tokens, text tokens, or both in FLUX's single blocks)."""
    from lorachain.data.selection import Task
    from lorachain.merging.fusion import load_grams
    from lorachain.modular import record_layer_inputs

    prompt, images = synthetic_tasks[0]
    task = Task("concept1", "object", "sks", "backpack", tuple(images), prompt, (prompt,), tuple(images[:1]))
    base, architecture = concepts["base"], concepts["architecture"]
    steps = 2
    record_layer_inputs(
        model_source=str(base),
        vae=None,
        state_dir=concepts["dirs"]["blocklora"][0],
        method_name="blocklora",
        method_params=MODULAR["blocklora"],
        task=task,
        target_modules=None,
        resolution=64,
        timesteps=steps,
        seed=0,
        output=tmp_path / "grams.safetensors",
        gram_dtype="float64",
        recording=recording,
    )
    grams = load_grams(tmp_path / "grams.safetensors")
    transformer = base_transformer(base, architecture)
    assert set(grams) == projection_names(transformer)
    pipe = load_pipeline(str(base))
    if architecture == "flux":  # T5's states
        text_tokens = pipe.encode_prompt(prompt, None)[0].shape[1]
    else:  # CLIP-L / CLIP-G's, then T5's
        text_tokens = pipe.encode_prompt(prompt, None, None, do_classifier_free_guidance=False)[0].shape[1]
    forwards = steps * (len(images) if recording == "images" else 1)
    image_tokens = (64 // 8 // 2) ** 2  # 2 x 2 patches of the 8 x 8 latents
    modules = dict(transformer.named_modules())
    for layer, (G, rows) in grams.items():
        assert G.shape == (modules[layer].in_features,) * 2 and torch.allclose(G, G.T), layer
        if layer.startswith("single_transformer_blocks."):
            tokens = text_tokens + image_tokens
        elif layer.endswith(("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")):
            tokens = text_tokens
        else:
            tokens = image_tokens
        assert rows == forwards * tokens, layer


def test_a_merge_of_transformer_concepts_exports_exactly(concepts, tmp_path):
    """export_merge of two Orthogonal Adaptation concepts: transformer keys, and a stock pipeline
    loading the file gives the transformer with the merge's formula added."""
    from lorachain.export import DIFFUSERS_FILE, export_merge
    from lorachain.modular import load_concept

    base, architecture = concepts["base"], concepts["architecture"]
    dirs = concepts["dirs"]["orthogonal_adaptation"]
    record = export_merge(dirs, "orthogonal_adaptation", {}, tmp_path / "out", merge_key="modular.merges.oa")
    assert record["exact"] and set(record["files"]) == {DIFFUSERS_FILE}
    assert all(key.startswith("transformer.") for key in load_file(tmp_path / "out" / DIFFUSERS_FILE))
    merged = make_merge("orthogonal_adaptation", {}).merge([load_concept(directory)[0] for directory in dirs])
    expected = folded_output(base, architecture, FoldedState(tasks_done=2, merged=merged))
    pipe = stock_pipeline(base, architecture)
    untouched = output_of(pipe.transformer)
    pipe.load_lora_weights(str(tmp_path / "out"))
    assert_same_model(output_of(pipe.transformer), expected, untouched)


def test_a_killed_flux_task_resumes_bit_identically(tiny_flux_dir, synthetic_tasks, tmp_path, monkeypatch):
    """The flow-matching draws (u from the step generator) resume as the DDPM ones do."""
    import lorachain.train as trainer

    options = dict(steps=4, checkpoint_every=2, batch_size=2)
    train(tiny_flux_dir, "flux", synthetic_tasks, 1, None, "merge_init", tmp_path / "whole", **options)
    accumulated = trainer._accumulated_loss

    def crash_at_step_3(step, *args, **kwargs):
        if step == 3:
            raise KeyboardInterrupt("killed")
        return accumulated(step, *args, **kwargs)

    monkeypatch.setattr(trainer, "_accumulated_loss", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_flux_dir, "flux", synthetic_tasks, 1, None, "merge_init", tmp_path / "resumed", **options)
    monkeypatch.setattr(trainer, "_accumulated_loss", accumulated)
    resumed = train(tiny_flux_dir, "flux", synthetic_tasks, 1, None, "merge_init", tmp_path / "resumed", **options)
    assert resumed["resumed_from_step"] == 2
    assert (tmp_path / "whole" / LORA_FILE).read_bytes() == (tmp_path / "resumed" / LORA_FILE).read_bytes()


@pytest.mark.parametrize("recording", ["images", "sampling"])
def test_a_flux_dev_concept_is_recorded_at_its_own_training_guidance(
    tiny_flux_dir, synthetic_tasks, tmp_path, monkeypatch, recording
):
    """The recorder feeds FLUX.1-dev's guidance embedding the value the concept was trained with
    (its manifest's training.guidance), not a constant."""
    from lorachain.data.selection import Task
    from lorachain.models.denoisers import FluxFamily
    from lorachain.modular import record_layer_inputs

    state = tmp_path / "concept"
    train(tiny_flux_dir, "flux", synthetic_tasks, 1, None, "naive", state, guidance=1.25, steps=1)
    seen = []
    forward = FluxFamily.forward

    def spy(self, model, noisy, timesteps, condition, time_ids, dtype, guidance=None):
        seen.append(guidance)
        return forward(self, model, noisy, timesteps, condition, time_ids, dtype, guidance)

    monkeypatch.setattr(FluxFamily, "forward", spy)
    prompt, images = synthetic_tasks[0]
    task = Task("concept1", "object", "sks", "backpack", tuple(images), prompt, (prompt,), tuple(images[:1]))
    record_layer_inputs(
        model_source=str(tiny_flux_dir),
        vae=None,
        state_dir=state,
        method_name="naive",
        method_params={},
        task=task,
        target_modules=None,
        resolution=64,
        timesteps=2,
        seed=0,
        output=tmp_path / "grams.safetensors",
        recording=recording,
    )
    assert seen and set(seen) == {1.25}
