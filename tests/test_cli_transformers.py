"""``lorachain train | sample | export`` on SD3 and FLUX.1: a chain by hand gives the workflow jobs'
files byte for byte (the flow-matching settings and FLUX's training guidance reach the trainer the
same way), its export loads in the stock pipeline, and a FLUX.1-dev run without its guidance is
refused with the dry-run's line before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cli import (
    SAMPLING_FLAGS,
    TRAINING_FLAGS,
    cli,
    cli_error,
    digests,
    hand_task,
    restore_threads,  # noqa: F401 (autouse: the commands set torch's thread count)
    sample_set,
    workflow_blocks,
)

from lorachain import plan
from lorachain.data.selection import write_tasks

GUIDANCE = {"sd3": {}, "flux": {"guidance": 3.5}}


def _train_by_hand(model, architecture, synthetic_tasks, out: Path) -> None:
    guidance = [f"--{key}" for key in GUIDANCE[architecture]] + [str(v) for v in GUIDANCE[architecture].values()]
    for index, (subject, (prompt, images)) in enumerate(zip(["backpack", "teapot"], synthetic_tasks), start=1):
        previous = ["--previous", out / f"task{index - 1:02d}"] if index > 1 else []
        first = ["--model", model, "--method", "merge_init", "--seed", 7] if index == 1 else []
        folder = Path(images[0]).parent
        flags = [*TRAINING_FLAGS, *guidance, "--images", folder, "--prompt", prompt, "--concept", subject]
        cli("train", *first, *previous, *flags, "--out", out / f"task{index:02d}")


def _train_by_jobs(model, architecture, synthetic_tasks, tmp_path: Path) -> dict:
    from lorachain.train import train_task_job

    config = workflow_blocks(model)
    config["training"].update(GUIDANCE[architecture])
    tasks = [hand_task(s, prompt, images) for s, (prompt, images) in zip(["backpack", "teapot"], synthetic_tasks)]
    write_tasks(tmp_path / "tasks.json", tasks)
    for index in (1, 2):
        out = tmp_path / f"lib/task{index:02d}"
        train_task_job(
            tasks=tmp_path / "tasks.json",
            task_index=index,
            previous_dir=None if index == 1 else tmp_path / f"lib/task{index - 1:02d}",
            method="merge_init",
            method_params={},
            training=plan.training_block(config),
            checkpoint_every=config["training"]["checkpoint_every"],
            tracking=config["training"]["tracking"],
            model=str(model),
            vae=None,
            run={"method": "merge_init", "seed": 7},
            seed=7,
            state=out / "state.json",
            lora=out / "pytorch_lora_weights.safetensors",
            loss=out / "loss.csv",
        )
    return config


@pytest.mark.parametrize("architecture", ["sd3", "flux"])
def test_a_transformer_chain_by_hand_is_the_jobs_chain(architecture, request, synthetic_tasks, tmp_path):
    import json

    from lorachain.sample import sample_state_job

    model = request.getfixturevalue(f"tiny_{architecture}_dir")
    _train_by_hand(model, architecture, synthetic_tasks, tmp_path / "cli")
    config = _train_by_jobs(model, architecture, synthetic_tasks, tmp_path)
    for index in (1, 2):
        assert digests(tmp_path / f"cli/task{index:02d}") == digests(tmp_path / f"lib/task{index:02d}"), index
    manifest = json.loads((tmp_path / "cli/task02/state.json").read_text())
    assert manifest["flow_matching"]["weighting_scheme"] == "logit_normal"
    assert manifest.get("guidance") == GUIDANCE[architecture].get("guidance")
    assert "add_q_proj" in manifest["target_modules"]  # the transformer's default targets

    cli("sample", tmp_path / "cli/task02", *SAMPLING_FLAGS, "--out", tmp_path / "cli-samples")
    sample_state_job(
        tasks=tmp_path / "tasks.json",
        task_index=2,
        state_dir=tmp_path / "lib/task02",
        method="merge_init",
        method_params={},
        sampling={**plan.stage_block(config, "sampling"), "prior_samples": False},
        model=str(model),
        vae=None,
        run={"method": "merge_init", "seed": 7},
        samples=tmp_path / "lib-samples",
    )
    ours, theirs = sample_set(tmp_path / "cli-samples"), sample_set(tmp_path / "lib-samples")
    assert sorted(ours) == ["index.csv", "task01/p0-n0.png", "task02/p0-n0.png"] and ours == theirs


@pytest.mark.parametrize("architecture", ["sd3", "flux"])
def test_a_transformer_export_by_hand_loads_in_the_stock_pipeline(architecture, request, synthetic_tasks, tmp_path):
    from lorachain.methods import make_method
    from lorachain.models.loading import load_pipeline
    from lorachain.state import apply_to_unet, fold_state
    from lorachain.torch_env import torch

    model = request.getfixturevalue(f"tiny_{architecture}_dir")
    _train_by_hand(model, architecture, synthetic_tasks, tmp_path / "cli")
    cli("export", tmp_path / "cli/task02", "--out", tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [
        "README.md",
        "export.json",
        "pytorch_lora_weights.safetensors",
    ]  # a transformer's default: the diffusers file only
    loaded = load_pipeline(str(model))
    loaded.load_lora_weights(str(tmp_path / "export"))
    folded = load_pipeline(str(model))
    apply_to_unet(folded.transformer, fold_state(tmp_path / "cli/task02", make_method("merge_init")))
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 16, 4, 4, generator=generator)
    prompt = "a photo of sks backpack"
    images = [
        pipe(prompt, num_inference_steps=2, height=32, width=32, output_type="pt", **_latents(pipe, hidden)).images
        for pipe in (loaded, folded)
    ]
    assert torch.allclose(images[0], images[1], atol=1e-4)
    base = load_pipeline(str(model))
    unchanged = base(prompt, num_inference_steps=2, height=32, width=32, output_type="pt", **_latents(base, hidden))
    assert not torch.allclose(unchanged.images, images[1], atol=1e-4)  # the LoRA changes the image


def _latents(pipe, noise) -> dict:
    from lorachain.models.denoisers import family_of

    return {"latents": family_of(pipe).pipeline_latents(noise.clone())}


def test_flux_dev_without_its_training_guidance_is_refused_before_anything_is_written(
    tiny_flux_dir, synthetic_images, capsys, tmp_path
):
    args = ["train", "--model", tiny_flux_dir, "--method", "merge_init", *TRAINING_FLAGS]
    folder = Path(synthetic_images[0]).parent
    err = cli_error(capsys, *args, "--images", folder, "--prompt", "a photo of sks backpack", "--out", tmp_path / "t")
    assert "config key training.guidance" in err and "FLUX.1-dev" in err
    assert not (tmp_path / "t").exists()
