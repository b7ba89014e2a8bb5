"""The DreamBooth-script training options (docs/protocol.md): prior preservation, learning-rate
schedule and warm-up, gradient accumulation, random flip, peft's lora_dropout, rsLoRA and
target_modules by regex, and which methods refuse which.

Every run trains task 1 of the tiny SD1 pipeline at 64 px, rank 4, for a few steps with one thread.
Losses and gradients are checked against a direct computation: the step generator's draws replayed
here in the trainer's documented order, and the stock U-Net called on them.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from lorachain.config_checks import training_option_problems
from lorachain.methods import MethodError, make_method
from lorachain.methods.base import TRAINING_OPTION_NAMES
from lorachain.plan import class_images_input, training_block
from lorachain.state import LORA_FILE, STATE_FILE, fold_state, load_adapters, read_manifest
from lorachain.torch_env import torch
from lorachain.train import (
    TaskSpec,
    TrainingConfig,
    TrainingError,
    _accumulated_loss,
    _encode_training_data,
    _load_model,
    _lr_schedule,
    _prepare_unet,
    _set_up_adapter,
    _step_loss,
    run_fingerprint,
    train_task,
)
from lorachain.training.adapters import lora_layers
from lorachain.training.config import LR_SCHEDULERS, TRAINING_OPTIONS, unset_options
from lorachain.training.prior import class_images_of, class_prompt, write_class_images

SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"
TRAINING = dict(rank=4, lora_alpha=8, steps=4, learning_rate=1e-3, resolution=64, batch_size=1, checkpoint_every=0)
PROMPT = "a photo of sks backpack"
CLASS_PROMPT = "a photo of a backpack"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def images(synthetic_tasks):
    return synthetic_tasks[0][1]


@pytest.fixture(scope="module")
def class_dir(synthetic_tasks, tmp_path_factory) -> Path:
    """Stand-in class images of "backpack": another subject's photos (what matters here is that
    they are not the instance images)."""
    import shutil

    folder = tmp_path_factory.mktemp("class") / "backpack"
    folder.mkdir()
    for index, path in enumerate(synthetic_tasks[1][1]):
        shutil.copy(path, folder / f"{index:04d}.png")
    return folder


def train(base, images, output_dir, method="merge_init", **training):
    extra = {key: training.pop(key) for key in ("class_images", "class_prompt") if key in training}
    return train_task(
        model_source=str(base),
        train_images=images,
        train_prompt=PROMPT,
        task_index=1,
        previous_state=None,
        method_name=method,
        method_params={},
        training={**TRAINING, **training},
        seed=0,
        output_dir=str(output_dir),
        run={"method": method},
        concept="backpack",
        progress=False,
        **extra,
    )


def lora_bytes(directory) -> bytes:
    return (Path(directory) / LORA_FILE).read_bytes()


# ------------------------------------------------------------------------------ defaults: nothing changes


def test_options_at_their_defaults_change_no_byte(tiny_sd1_dir, images, tmp_path):
    """Options set to their defaults give the same LoRA file, manifest and fingerprint as a block
    without them; the workflow leaves them out of the job params."""
    defaults = {key: getattr(TrainingConfig(), key) for key in TRAINING_OPTIONS}
    plain = train(tiny_sd1_dir, images, tmp_path / "plain")
    explicit = train(tiny_sd1_dir, images, tmp_path / "explicit", **defaults)
    assert lora_bytes(tmp_path / "plain") == lora_bytes(tmp_path / "explicit")
    assert "training_options" not in read_manifest(tmp_path / "plain")
    assert plain["final_loss"] == explicit["final_loss"]
    first = fingerprint(TrainingConfig.from_dict(TRAINING), images)
    assert first == fingerprint(TrainingConfig.from_dict({**TRAINING, **defaults}), images)
    assert not set(first["training"]) & set(TRAINING_OPTIONS)
    config = {"training": {**TRAINING, **defaults}}
    assert training_block(config) == training_block({"training": TRAINING})
    assert sorted(unset_options(config["training"])) == sorted(TRAINING_OPTIONS)


def test_schema_defaults_are_the_trainers():
    schema = yaml.safe_load(SCHEMA.read_text())["properties"]["training"]["properties"]
    for key in TRAINING_OPTIONS:
        assert schema[key]["default"] == getattr(TrainingConfig(), key), key
    assert schema["lr_scheduler"]["enum"] == list(LR_SCHEDULERS)
    # the options a method may refuse: each trainer option (a warm-up is part of the schedule), and
    # target_modules given as a regex
    details = {"lr_warmup_steps", "prior_loss_weight", "num_class_images"}
    assert set(TRAINING_OPTION_NAMES) == (set(TRAINING_OPTIONS) - details) | {"target_modules"}


def fingerprint(config: TrainingConfig, images, class_images=None) -> dict:
    return run_fingerprint(
        config=config,
        method=make_method("merge_init"),
        task_index=1,
        seed=0,
        this_seed=1,
        model_source="base",
        vae=None,
        train_images=images,
        train_prompt=PROMPT,
        previous_state=None,
        run={},
        concept="backpack",
        class_images=class_images,
    )


@pytest.mark.parametrize(
    "option",
    [
        {"lr_scheduler": "cosine"},
        {"lr_warmup_steps": 3},
        {"gradient_accumulation_steps": 2},
        {"random_flip": True},
        {"lora_dropout": 0.1},
        {"use_rslora": True},
        {"prior_preservation": True},
        {"target_modules": r".*attn1\.to_q"},
    ],
)
def test_each_option_enters_the_fingerprint(option, images):
    plain = fingerprint(TrainingConfig.from_dict(TRAINING), images)
    changed = fingerprint(TrainingConfig.from_dict({**TRAINING, **option}), images)
    (key, value), *_ = option.items()
    assert changed != plain and changed["training"][key] == value


def test_prior_details_count_only_with_the_prior(images, class_dir):
    without = TrainingConfig.from_dict({**TRAINING, "prior_loss_weight": 0.5, "num_class_images": 7})
    assert without.options_set() == {}
    with_prior = TrainingConfig.from_dict({**TRAINING, "prior_preservation": True, "prior_loss_weight": 0.5})
    assert with_prior.options_set() == {"prior_preservation": True, "prior_loss_weight": 0.5}
    paths = sorted(str(p) for p in class_dir.glob("*.png"))
    assert (
        fingerprint(with_prior, images, paths)["class_images"]
        != fingerprint(with_prior, images, paths[:1])["class_images"]
    )


def test_the_manifest_records_the_options_set(tiny_sd1_dir, images, class_dir, tmp_path):
    options = dict(
        lr_scheduler="cosine",
        lr_warmup_steps=1,
        gradient_accumulation_steps=2,
        random_flip=True,
        lora_dropout=0.1,
        use_rslora=True,
        prior_preservation=True,
        prior_loss_weight=0.5,
        num_class_images=2,
    )
    paths = sorted(str(p) for p in class_dir.glob("*.png"))[:2]
    train(tiny_sd1_dir, images, tmp_path / "run", class_images=paths, class_prompt=CLASS_PROMPT, **options)
    manifest = read_manifest(tmp_path / "run")
    assert manifest["training_options"] == {**options, "class_prompt": CLASS_PROMPT, "class_images": 2}


# ------------------------------------------------------------------------------ direct computations


def prepared(base, images, tmp_path, **training):
    """The trainer's objects for task 1 (model, data), built by its own phases."""
    from lorachain.train import _accelerator

    class_images = tuple(training.pop("class_images", ()))
    config = TrainingConfig.from_dict({**TRAINING, **training})
    task = TaskSpec(
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
        class_images=class_images,
        class_prompt=CLASS_PROMPT if class_images else None,
    )
    method = make_method("merge_init")
    accelerator = _accelerator(config)
    pipe, config, layers, crops = _load_model(task, config, method, "methods.merge_init")
    adapters, masks = _set_up_adapter(pipe.unet, method, layers, task, config)
    data = _encode_training_data(pipe, crops, task, config, accelerator.device)
    model = _prepare_unet(pipe.unet, adapters, masks, layers, method, task, config, accelerator)
    with torch.no_grad():  # B = 0 at init: give the LoRA a nonzero delta so gradients reach A too
        for _, parameter in model.named_trainable:
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(7)))
    return config, data, model, pipe


def direct_loss(model, data, source, generator, batch):
    """The denoising MSE of `batch` images of `source` computed here: draws in the trainer's order
    (image indices, posterior noise, noise, timesteps), a stock DDPM add_noise and the U-Net."""
    indices = torch.randint(0, source.count, (batch,), generator=generator)
    mean, std = source.latent_mean[indices], source.latent_std[indices]
    eps = torch.randn(mean.shape, generator=generator)
    noise = torch.randn(mean.shape, generator=generator)
    timesteps = torch.randint(0, data.objective.scheduler.config.num_train_timesteps, (batch,), generator=generator)
    latents = (mean + std * eps) * data.family.scaling_factor
    alphas = data.objective.scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noisy = alphas.sqrt() * latents + (1 - alphas).sqrt() * noise
    hidden = source.condition["encoder_hidden_states"].expand(batch, -1, -1)
    prediction = model.unet(noisy, timesteps, encoder_hidden_states=hidden).sample
    return torch.nn.functional.mse_loss(prediction, noise)


def test_prior_loss_is_the_two_term_loss(tiny_sd1_dir, images, class_dir, tmp_path):
    paths = sorted(str(p) for p in class_dir.glob("*.png"))
    weight = 0.7
    config, data, model, _ = prepared(
        tiny_sd1_dir, images, tmp_path, prior_preservation=True, prior_loss_weight=weight, class_images=paths
    )
    assert data.prior.count == len(paths)
    trainer = _step_loss(0, data, model, torch.Generator().manual_seed(5), config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        instance = direct_loss(model, data, data, generator, 1)
        prior = direct_loss(model, data, data.prior, generator, 1)
    assert trainer.item() == pytest.approx((instance + weight * prior).item(), rel=1e-5)
    assert prior.item() > 0 and instance.item() != pytest.approx(trainer.item(), rel=1e-3)


def test_accumulating_two_batches_of_one_is_one_batch_of_two(tiny_sd1_dir, images, tmp_path):
    config, data, model, _ = prepared(tiny_sd1_dir, images, tmp_path, gradient_accumulation_steps=2)
    loss = _accumulated_loss(0, data, model, torch.Generator().manual_seed(3), config)
    accumulated = [p.grad.clone() for p in model.trainable]
    assert not loss.requires_grad  # backpropagated micro-batch by micro-batch already
    model.optimizer.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(3)
    draws = []
    for _ in range(2):  # micro-batch k: its image index, then its noises, from the step generator
        index = torch.randint(0, data.count, (1,), generator=generator)
        shape = (1, *data.latent_mean.shape[1:])
        eps, noise = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
        timesteps = torch.randint(0, data.objective.scheduler.config.num_train_timesteps, (1,), generator=generator)
        draws.append((index, eps, noise, timesteps))
    index, eps, noise, timesteps = (torch.cat(parts) for parts in zip(*draws))
    replay = iter([eps, noise, timesteps])
    latents = (data.latent_mean[index] + data.latent_std[index] * next(replay)) * data.family.scaling_factor
    noise, timesteps = next(replay), next(replay)
    alphas = data.objective.scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noisy = alphas.sqrt() * latents + (1 - alphas).sqrt() * noise
    hidden = data.condition["encoder_hidden_states"].expand(2, -1, -1)
    batch_loss = torch.nn.functional.mse_loss(model.unet(noisy, timesteps, encoder_hidden_states=hidden).sample, noise)
    batch_loss.backward()
    assert loss.item() == pytest.approx(batch_loss.item(), rel=1e-5)
    for mine, theirs in zip(accumulated, (p.grad for p in model.trainable)):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-7)


def test_accumulation_steps_the_optimizer_once_per_k_micro_batches(tiny_sd1_dir, images, tmp_path, monkeypatch):
    calls = {"forward": 0, "step": 0}
    from diffusers import UNet2DConditionModel

    forward, step = UNet2DConditionModel.forward, torch.optim.AdamW.step

    def counted_forward(self, *args, **kwargs):
        calls["forward"] += 1
        return forward(self, *args, **kwargs)

    def counted_step(self, *args, **kwargs):
        calls["step"] += 1
        return step(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", counted_forward)
    monkeypatch.setattr(torch.optim.AdamW, "step", counted_step)
    manifest = train(tiny_sd1_dir, images, tmp_path / "run", steps=3, gradient_accumulation_steps=2)
    assert calls == {"forward": 6, "step": 3}
    assert manifest["steps"] == 3


def test_schedule_gives_get_schedulers_learning_rate_per_step(tiny_sd1_dir, images, tmp_path, monkeypatch):
    from diffusers.optimization import get_scheduler

    steps, warmup, lr = 6, 2, 1e-3
    seen = []
    step = torch.optim.AdamW.step

    def recorded(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recorded)
    train(tiny_sd1_dir, images, tmp_path / "run", steps=steps, lr_scheduler="linear", lr_warmup_steps=warmup)
    parameter = torch.nn.Parameter(torch.zeros(1))
    reference = get_scheduler(
        "linear",
        optimizer=torch.optim.SGD([parameter], lr=lr),
        num_warmup_steps=warmup,
        num_training_steps=steps,
    )
    expected = [lr * reference.lr_lambdas[0](step) for step in range(steps)]
    assert seen == pytest.approx(expected)
    # linear warm-up to lr, then linear decay to 0 (the closed form)
    closed = [lr * s / warmup if s < warmup else lr * (steps - s) / (steps - warmup) for s in range(steps)]
    assert seen == pytest.approx(closed)


def test_schedule_positioned_at_a_resumed_step_continues_the_same():
    config = TrainingConfig.from_dict({**TRAINING, "steps": 10, "lr_scheduler": "cosine", "lr_warmup_steps": 3})
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=1e-3)
    schedule = _lr_schedule(optimizer, config, 0)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    resumed_optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    state = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    _lr_schedule(state, config, 0)  # a run that wrote its checkpoint holds initial_lr in its groups
    resumed_optimizer.load_state_dict(state.state_dict())
    _lr_schedule(resumed_optimizer, config, 4)
    assert resumed_optimizer.param_groups[0]["lr"] == rates[4]
    assert _lr_schedule(optimizer, TrainingConfig.from_dict(TRAINING), 0) is None


def test_resume_with_every_option_is_bit_identical(tiny_sd1_dir, images, class_dir, tmp_path, monkeypatch):
    """A run killed after its checkpoint at step 3 and rerun ends byte-identical to an uninterrupted one."""
    import lorachain.train as trainer

    paths = sorted(str(p) for p in class_dir.glob("*.png"))[:2]
    options = dict(
        steps=6,
        checkpoint_every=3,
        lr_scheduler="cosine",
        lr_warmup_steps=2,
        gradient_accumulation_steps=2,
        random_flip=True,
        lora_dropout=0.2,
        use_rslora=True,
        prior_preservation=True,
        num_class_images=2,
        class_images=paths,
        class_prompt=CLASS_PROMPT,
    )
    whole = train(tiny_sd1_dir, images, tmp_path / "whole", **dict(options))
    accumulated = trainer._accumulated_loss

    def crash_at_step_4(step, *args, **kwargs):
        if step == 4:
            raise KeyboardInterrupt("killed")
        return accumulated(step, *args, **kwargs)

    monkeypatch.setattr(trainer, "_accumulated_loss", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_sd1_dir, images, tmp_path / "resumed", **dict(options))
    monkeypatch.setattr(trainer, "_accumulated_loss", accumulated)
    resumed = train(tiny_sd1_dir, images, tmp_path / "resumed", **dict(options))
    assert resumed["resumed_from_step"] == 3
    assert lora_bytes(tmp_path / "whole") == lora_bytes(tmp_path / "resumed")
    assert resumed["final_loss"] == whole["final_loss"]


# ------------------------------------------------------------------------------ random flip


def test_random_flip_encodes_mirror_images_and_draws_both(tiny_sd1_dir, images, tmp_path):
    config, data, model, pipe = prepared(tiny_sd1_dir, images, tmp_path, random_flip=True)
    with torch.no_grad():
        from lorachain.training.conditioning import load_training_image

        crops = [load_training_image(p, 64, torch.Generator().manual_seed(1)) for p in images][:1]
        pixels = torch.flip(torch.stack([crops[0][0]]), dims=[-1])
        mirrored = pipe.vae.encode(pixels).latent_dist.mean
    torch.testing.assert_close(data.flipped[0][:1], mirrored)
    assert not torch.equal(data.flipped[0], data.latent_mean)
    from lorachain.train import _draw_seed

    generators = [torch.Generator().manual_seed(_draw_seed(1, 2, step, 0)) for step in range(20)]
    draws = [bool(torch.rand(1, generator=generator) < 0.5) for generator in generators]
    assert 0 < sum(draws) < 20


def test_random_flip_changes_training_and_is_deterministic(tiny_sd1_dir, images, tmp_path):
    train(tiny_sd1_dir, images, tmp_path / "plain")
    train(tiny_sd1_dir, images, tmp_path / "flip1", random_flip=True)
    train(tiny_sd1_dir, images, tmp_path / "flip2", random_flip=True)
    assert lora_bytes(tmp_path / "flip1") == lora_bytes(tmp_path / "flip2")
    assert lora_bytes(tmp_path / "flip1") != lora_bytes(tmp_path / "plain")


# ------------------------------------------------------------------------------ peft's LoRA options


def test_rslora_scale_is_recorded_and_exported(tiny_sd1_dir, images, tmp_path):
    """rsLoRA's alpha / sqrt(r) is peft's scaling in training, the state's fold and the exported
    diffusers LoRA file loaded into a stock pipeline."""
    from diffusers import StableDiffusionPipeline

    assert TrainingConfig.from_dict({**TRAINING, "use_rslora": True}).scale == 8 / math.sqrt(4)
    assert TrainingConfig.from_dict(TRAINING).scale == 8 / 4
    train(tiny_sd1_dir, images, tmp_path / "run", use_rslora=True, learning_rate=1e-2)
    manifest = read_manifest(tmp_path / "run")
    adapters = load_adapters(tmp_path / "run", manifest)
    assert {adapter.scale for adapter in adapters.values()} == {4.0}
    state = fold_state(tmp_path / "run", make_method("merge_init"))
    name = sorted(state.merged)[0]
    torch.testing.assert_close(state.merged[name], 4.0 * adapters[name].B @ adapters[name].A)

    def unet_output(pipe):
        generator = torch.Generator().manual_seed(0)
        sample = torch.randn((1, 4, 8, 8), generator=generator)
        hidden = torch.randn((1, 77, pipe.unet.config.cross_attention_dim), generator=generator)
        with torch.no_grad():
            return pipe.unet(sample, torch.tensor([500]), encoder_hidden_states=hidden).sample

    from lorachain.state import apply_to_unet

    ours = StableDiffusionPipeline.from_pretrained(tiny_sd1_dir)
    apply_to_unet(ours.unet, state)
    stock = StableDiffusionPipeline.from_pretrained(tiny_sd1_dir)
    stock.load_lora_weights(str(tmp_path / "run"), weight_name=LORA_FILE)
    base = StableDiffusionPipeline.from_pretrained(tiny_sd1_dir)
    assert not torch.allclose(unet_output(base), unet_output(ours), atol=1e-6)
    torch.testing.assert_close(unet_output(stock), unet_output(ours), rtol=1e-4, atol=1e-5)


def test_dropout_changes_training_but_not_the_saved_form(tiny_sd1_dir, images, tmp_path):
    train(tiny_sd1_dir, images, tmp_path / "plain")
    train(tiny_sd1_dir, images, tmp_path / "drop1", lora_dropout=0.5)
    train(tiny_sd1_dir, images, tmp_path / "drop2", lora_dropout=0.5)
    assert lora_bytes(tmp_path / "drop1") == lora_bytes(tmp_path / "drop2")  # seeded per step
    assert lora_bytes(tmp_path / "drop1") != lora_bytes(tmp_path / "plain")
    plain, dropped = load_file(tmp_path / "plain" / LORA_FILE), load_file(tmp_path / "drop1" / LORA_FILE)
    assert {k: v.shape for k, v in plain.items()} == {k: v.shape for k, v in dropped.items()}  # B·A, nothing else
    manifest = read_manifest(tmp_path / "drop1")
    state = fold_state(tmp_path / "drop1", make_method("merge_init"))
    adapters = load_adapters(tmp_path / "drop1", manifest)
    for name, adapter in adapters.items():
        torch.testing.assert_close(state.merged[name], 2.0 * adapter.B @ adapter.A)


def test_target_modules_by_regex(tiny_sd1_dir, images, tmp_path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd1_dir, subfolder="unet")
    pattern = r".*attn2\.to_(k|v)"
    chosen = lora_layers(unet, pattern)
    assert chosen and all(name.endswith(("attn2.to_k", "attn2.to_v")) for name in chosen)
    assert set(chosen) == {name for name in lora_layers(unet, ["to_k", "to_v"]) if ".attn2." in name}
    train(tiny_sd1_dir, images, tmp_path / "run", target_modules=pattern)
    manifest = read_manifest(tmp_path / "run")
    assert manifest["target_modules"] == pattern
    assert set(load_adapters(tmp_path / "run", manifest)) == set(chosen)
    with pytest.raises(TrainingError, match=r"training\.target_modules.*not linear"):
        train(tiny_sd1_dir, images, tmp_path / "wide", target_modules=r".*attn2(\.to_k)?")
    with pytest.raises(TrainingError, match=r"training\.target_modules.*not a valid regex"):
        lora_layers(unet, "(")


# ------------------------------------------------------------------------------ refusals


def test_blocklora_refuses_dropout_naming_both_keys(tiny_sd1_dir, images, tmp_path):
    with pytest.raises(MethodError, match=r"methods\.blocklora .*training\.lora_dropout"):
        train(tiny_sd1_dir, images, tmp_path / "run", method="blocklora", lora_dropout=0.1)
    assert not (tmp_path / "run" / STATE_FILE).exists()
    config = {
        "training": {**TRAINING, "lora_dropout": 0.1},
        "methods": {"block": {"method": "blocklora"}, "plain": {"method": "merge_init"}},
        "domains": {},
    }
    problems = training_option_problems(config)
    assert len(problems) == 1 and "methods.block" in problems[0] and "training.lora_dropout" in problems[0]
    config["training"]["lora_dropout"] = 0.0
    assert training_option_problems(config) == []


def test_prior_preservation_without_a_class_names_the_key(tiny_sd1_dir, images, tmp_path):
    with pytest.raises(TrainingError, match=r"training\.prior_preservation"):
        train(tiny_sd1_dir, images, tmp_path / "run", prior_preservation=True)
    config = {
        "training": {**TRAINING, "prior_preservation": True},
        "methods": {"naive": {"method": "naive"}},
        "domains": {
            "objects": {"dataset": {"layout": "dreambooth"}},
            "styles": {"dataset": {"layout": "unlearncanvas"}},
        },
    }
    problems = training_option_problems(config)
    assert len(problems) == 1 and "training.prior_preservation" in problems[0] and "'styles'" in problems[0]
    assert class_images_input(config, "objects") == ["results/objects/class_images"]
    assert class_images_input({"training": TRAINING}, "objects") == []


def test_prior_inputs_refuse_a_style_task(tmp_path):
    from lorachain.data.selection import Task
    from lorachain.train import _prior_inputs

    style = Task(
        concept="Byzantine",
        kind="style",
        token=None,
        class_name="Butterfly",
        train_images=(),
        train_prompt="a Byzantine painting",
        eval_prompts=(),
        reference_images=(),
    )
    with pytest.raises(TrainingError, match=r"training\.prior_preservation.*style"):
        _prior_inputs(style, {"prior_preservation": True}, tmp_path)
    assert _prior_inputs(style, {}, None) == {}


def test_prior_inputs_of_an_object_task(class_dir):
    """A job's class_images input (the rule's list of one directory) gives the class's images."""
    from lorachain.data.selection import Task
    from lorachain.train import _prior_inputs

    backpack_task = Task(
        concept="backpack",
        kind="object",
        token="sks",
        class_name="backpack",
        train_images=(),
        train_prompt=PROMPT,
        eval_prompts=(),
        reference_images=(),
    )
    training = {"prior_preservation": True, "num_class_images": 2}
    inputs = _prior_inputs(backpack_task, training, [str(class_dir.parent)])
    assert inputs == {"class_images": sorted(str(p) for p in class_dir.glob("*.png"))[:2], "class_prompt": CLASS_PROMPT}
    with pytest.raises(TrainingError, match="num_class_images"):
        _prior_inputs(backpack_task, {**training, "num_class_images": 50}, str(class_dir.parent))


# ------------------------------------------------------------------------------ class images


def test_class_images_are_the_base_models_and_deterministic(tiny_sd1_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    from lorachain.sample import SamplingConfig, initial_noises

    sampling = SamplingConfig(steps=2, resolution=32, batch_size=2, noise_seed=4)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1_dir)
    pipe.set_progress_bar_config(disable=True)
    assert write_class_images(pipe, ["backpack", "teapot"], 2, sampling, tmp_path / "a") == 4
    write_class_images(pipe, ["backpack", "teapot"], 2, sampling, tmp_path / "b")
    first = class_images_of(tmp_path / "a", "backpack", 2)
    assert [Path(p).read_bytes() for p in first] == [
        Path(p).read_bytes() for p in class_images_of(tmp_path / "b", "backpack", 2)
    ]
    # the stock pipeline on the class prompt from the documented noises (noise_seed + 1)
    config = SamplingConfig(steps=2, resolution=32, batch_size=2, noise_seed=5, num_samples=2)
    latents = initial_noises(config, pipe.unet.config.in_channels, 2 ** (len(pipe.vae.config.block_out_channels) - 1))
    stock = pipe(
        prompt=[class_prompt("backpack")] * 2,
        latents=latents,
        num_inference_steps=2,
        guidance_scale=sampling.guidance_scale,
        height=32,
        width=32,
        output_type="np",
    ).images
    import numpy as np
    from PIL import Image

    mine = np.stack([np.asarray(Image.open(p)) for p in first]).astype(np.float32) / 255
    assert np.abs(mine - stock).max() <= 1 / 255 + 1e-6
    with pytest.raises(TrainingError, match="num_class_images.*class_images rule"):
        class_images_of(tmp_path / "a", "backpack", 3)


def test_manifest_json_is_plain(tiny_sd1_dir, images, tmp_path):
    """The manifest's options are plain JSON values (read back equal)."""
    train(tiny_sd1_dir, images, tmp_path / "run", lr_scheduler="constant_with_warmup", lr_warmup_steps=2)
    text = (tmp_path / "run" / STATE_FILE).read_text()
    assert json.loads(text)["training_options"] == {"lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 2}


# ------------------------------------------------------------------------------ the workflow


def dry_run(config: dict, workdir: Path):
    import subprocess

    from conftest import snakemake_command

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    command = snakemake_command("-n", "--configfile", str(workdir / "config.yaml"), workdir=workdir)
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def demo_objects(**training) -> dict:
    """config/demo.yaml without its styles (prior preservation needs a class word)."""
    config = yaml.safe_load((SCHEMA.parents[2] / "config" / "demo.yaml").read_text())
    del config["domains"]["styles"]
    config["modular"].pop("mixes")
    config.pop("compositions")
    config["training"].update(training)
    return config


def test_prior_preservation_puts_one_class_images_job_per_domain_in_the_dag(tmp_path):
    result = dry_run(demo_objects(prior_preservation=True, num_class_images=4), tmp_path / "prior")
    assert result.returncode == 0, result.stderr[-3000:]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", result.stdout, flags=re.M))
    assert counts["class_images"] == "1"
    train_jobs = re.findall(r"rule train_(?:task|concept):\n(?:    .*\n)*?    input: (.*)\n", result.stdout)
    assert train_jobs and all("results/objects/class_images" in inputs for inputs in train_jobs)
    plain = dry_run(demo_objects(), tmp_path / "plain")
    assert plain.returncode == 0 and "class_images" not in plain.stdout


def test_a_refused_option_fails_the_dry_run_naming_the_keys(tmp_path):
    result = dry_run(demo_objects(lora_dropout=0.1), tmp_path / "dropout")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "modular.adapters.blocklora" in output and "training.lora_dropout" in output
