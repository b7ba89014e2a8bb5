"""Sampling: paired initial noises, determinism, the index, and bad states."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from lorachain.data import Task
from lorachain.sample import (
    INDEX_COLUMNS,
    SamplingConfig,
    SamplingError,
    initial_noises,
    load_model_for_sampling,
    read_index,
    sample_after_task,
)
from lorachain.state import STATE_FILE, StateError
from lorachain.torch_env import torch
from lorachain.train import train_task

SAMPLING = dict(num_samples=2, steps=4, resolution=64, batch_size=3, guidance_scale=5.0)
TRAINING = dict(rank=4, lora_alpha=4, steps=3, learning_rate=1e-3, resolution=64, batch_size=2)


def make_task(concept: str, images: list[str], prompts=("a {} in a jail", "a {} wearing a santa hat")) -> Task:
    return Task(
        concept=concept,
        kind="object",
        token="sks",
        class_name=concept,
        train_images=images,
        train_prompt=f"a photo of sks {concept}",
        eval_prompts=[p.format(f"sks {concept}") for p in prompts],
        reference_images=images,
    )


@pytest.fixture(scope="module")
def tasks(synthetic_tasks):
    return [make_task(f"concept{index}", images) for index, (_, images) in enumerate(synthetic_tasks[:2], start=1)]


@pytest.fixture(scope="module")
def tasks_file(tasks, tmp_path_factory) -> Path:
    from lorachain.data import write_tasks

    path = tmp_path_factory.mktemp("tasks") / "order0.json"
    write_tasks(path, tasks, domain="objects", order=0)
    return path


@pytest.fixture(scope="module")
def states(tiny_sd1_dir, tasks, tmp_path_factory) -> dict[str, list[Path]]:
    """Tasks 1 and 2 of naive and merge_init: after task 1 the two are the same model."""
    root = tmp_path_factory.mktemp("states")
    result = {}
    for method in ("naive", "merge_init"):
        previous, dirs = None, []
        for index, task in enumerate(tasks, start=1):
            directory = root / method / f"task{index:02d}"
            train_task(
                model_source=str(tiny_sd1_dir),
                train_images=list(task.train_images),
                train_prompt=task.train_prompt,
                task_index=index,
                previous_state=previous,
                method_name=method,
                method_params={},
                training=TRAINING,
                seed=0,
                output_dir=directory,
                run={"method": method},
                concept=task.concept,
                progress=False,
            )
            dirs.append(directory)
            previous = directory
        result[method] = dirs
    return result


def sample(tiny_sd1_dir, tasks_file, state_dir, method, output_dir, after=2, **overrides):
    return sample_after_task(
        tasks_file=tasks_file,
        task_index=after,
        state_dir=state_dir,
        method_name=method,
        method_params={},
        sampling={**SAMPLING, **overrides},
        model_source=str(tiny_sd1_dir),
        vae=None,
        output_dir=output_dir,
        identity={"model": method, "method": method, "domain": "objects", "order": 0, "seed": 0, "after_task": after},
    )


def digests(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*.png"))
    }


def max_pixel_difference(first: Path, second: Path) -> int:
    import numpy as np
    from PIL import Image

    worst = 0
    for path in sorted(first.rglob("*.png")):
        a = np.asarray(Image.open(path), dtype=int)
        b = np.asarray(Image.open(second / path.relative_to(first)), dtype=int)
        worst = max(worst, int(np.abs(a - b).max()))
    return worst


def test_initial_noises_are_a_pure_function_of_the_seed():
    config = SamplingConfig(num_samples=3, resolution=64, noise_seed=42)
    a, b = initial_noises(config, 4), initial_noises(config, 4)
    assert a.shape == (3, 4, 8, 8) and torch.equal(a, b)
    assert not torch.equal(a, initial_noises(SamplingConfig(num_samples=3, resolution=64, noise_seed=43), 4))
    # a larger N extends the same noises: sample n is the same whatever N is
    assert torch.equal(initial_noises(SamplingConfig(num_samples=5, resolution=64, noise_seed=42), 4)[:3], a)


def test_sample_set_index_and_images(tiny_sd1_dir, tasks_file, tasks, states, tmp_path):
    timings = sample(tiny_sd1_dir, tasks_file, states["naive"][1], "naive", tmp_path / "after02")
    frame = read_index(tmp_path / "after02")
    assert tuple(frame.columns) == INDEX_COLUMNS
    # after task 2: tasks 1 and 2, 2 prompts plus the class prompt each, 2 noises each
    assert len(frame) == timings["images"] == 2 * 3 * 2
    assert sorted(set(frame["task"])) == [1, 2] and set(frame["after_task"]) == {2}
    concept_rows, prior_rows = frame[frame["role"] == "concept"], frame[frame["role"] == "prior"]
    assert list(concept_rows[concept_rows["task"] == 1]["prompt"].unique()) == list(tasks[0].eval_prompts)
    assert list(prior_rows[prior_rows["task"] == 1]["prompt"].unique()) == [tasks[0].prior_prompt]
    assert set(prior_rows["prompt_index"]) == {-1} and len(prior_rows) == 2 * 2
    assert tasks[0].token not in tasks[0].prior_prompt and tasks[0].class_name in tasks[0].prior_prompt
    assert set(frame["noise_seed"]) == {42} and sorted(set(frame["sample"])) == [0, 1]
    from PIL import Image

    with Image.open(frame["path"][0]) as image:
        assert image.size == (64, 64) and image.format == "PNG"
    assert not list(tmp_path.glob(".after02.tmp*"))  # staged, then renamed


def test_sampling_is_deterministic_and_paired_across_methods(tiny_sd1_dir, tasks_file, states, tmp_path):
    sample(tiny_sd1_dir, tasks_file, states["naive"][1], "naive", tmp_path / "a", after=2)
    sample(tiny_sd1_dir, tasks_file, states["naive"][1], "naive", tmp_path / "b", after=2)
    assert digests(tmp_path / "a") == digests(tmp_path / "b")  # same state, seeds and config: bit-identical
    # Another batch size changes only float rounding (batched kernels), not the images.
    sample(tiny_sd1_dir, tasks_file, states["naive"][1], "naive", tmp_path / "c", after=2, batch_size=5)
    assert max_pixel_difference(tmp_path / "a", tmp_path / "c") <= 2
    # After task 1, naive and merge_init are the same model (a fresh LoRA trained with the same
    # seed on W0), so the shared noises give the same images; after task 2 they differ.
    sample(tiny_sd1_dir, tasks_file, states["naive"][0], "naive", tmp_path / "naive1", after=1)
    sample(tiny_sd1_dir, tasks_file, states["merge_init"][0], "merge_init", tmp_path / "merge1", after=1)
    assert digests(tmp_path / "naive1") == digests(tmp_path / "merge1")
    sample(tiny_sd1_dir, tasks_file, states["merge_init"][1], "merge_init", tmp_path / "merge2", after=2)
    assert digests(tmp_path / "merge2") != digests(tmp_path / "a")
    # The state is really applied: the base model draws other images from the same noises.
    sample_after_task(
        tasks_file=tasks_file,
        task_index=None,
        state_dir=None,
        method_name=None,
        method_params=None,
        sampling=SAMPLING,
        model_source=str(tiny_sd1_dir),
        vae=None,
        output_dir=tmp_path / "base",
        identity={"model": "base", "method": "base", "domain": "objects", "order": "", "seed": "", "after_task": 0},
    )
    assert digests(tmp_path / "base").keys() == digests(tmp_path / "a").keys()
    assert digests(tmp_path / "base") != digests(tmp_path / "a")


def test_failed_sampling_keeps_the_previous_sample_set(tiny_sd1_dir, tasks_file, states, tmp_path, monkeypatch):
    output = tmp_path / "after02"
    sample(tiny_sd1_dir, tasks_file, states["naive"][1], "naive", output)
    before = digests(output)
    import lorachain.sample as sampling

    monkeypatch.setattr(sampling, "write_index", lambda *args: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        sample(tiny_sd1_dir, tasks_file, states["naive"][1], "naive", output, steps=2)
    assert digests(output) == before


def test_state_of_another_architecture_is_refused(tiny_sdxl_dir, tasks_file, states, tmp_path):
    with pytest.raises(
        StateError,
        match=rf"{STATE_FILE}: written for a StableDiffusionPipeline, but model .* is a StableDiffusionXLPipeline",
    ):
        load_model_for_sampling(str(tiny_sdxl_dir), None, states["naive"][0], "naive", {})


def test_missing_or_foreign_state_is_refused(tiny_sd1_dir, states, tmp_path):
    with pytest.raises(StateError, match=r"nowhere/state.json: state manifest missing"):
        load_model_for_sampling(str(tiny_sd1_dir), None, tmp_path / "nowhere", "naive", {})
    copy = tmp_path / "copy"
    shutil.copytree(states["naive"][0], copy)
    manifest = json.loads((copy / STATE_FILE).read_text())
    (copy / STATE_FILE).write_text(json.dumps({**manifest, "base_model": "someone/else"}))
    with pytest.raises(StateError, match="trained on base model 'someone/else'"):
        load_model_for_sampling(str(tiny_sd1_dir), None, copy, "naive", {})
    with pytest.raises(StateError, match="written by method"):
        load_model_for_sampling(str(tiny_sd1_dir), None, states["naive"][0], "magmax", {})


def test_bad_sampling_config_names_the_key(tiny_sd1_dir, tasks_file, states, tmp_path):
    with pytest.raises(SamplingError, match="sampling.scheduler: 'Nonsense'"):
        sample(tiny_sd1_dir, tasks_file, states["naive"][0], "naive", tmp_path / "x", after=1, scheduler="Nonsense")
    with pytest.raises(SamplingError, match="sampling: unknown keys \\['stepz'\\]"):
        SamplingConfig.from_dict({"stepz": 3})
    with pytest.raises(SamplingError, match="holds 2 tasks"):
        sample(tiny_sd1_dir, tasks_file, states["naive"][0], "naive", tmp_path / "x", after=3)


def test_other_scheduler_by_class_name(tiny_sd1_dir, tasks_file, states, tmp_path):
    sample(tiny_sd1_dir, tasks_file, states["naive"][0], "naive", tmp_path / "ddim", after=1, scheduler="DDIMScheduler")
    sample(tiny_sd1_dir, tasks_file, states["naive"][0], "naive", tmp_path / "euler", after=1)
    assert digests(tmp_path / "ddim") != digests(tmp_path / "euler")


def test_read_index_checks_images(tiny_sd1_dir, tasks_file, states, tmp_path):
    sample(tiny_sd1_dir, tasks_file, states["naive"][0], "naive", tmp_path / "s", after=1)
    next((tmp_path / "s").rglob("*.png")).unlink()
    with pytest.raises(SamplingError, match="listed images are missing"):
        read_index(tmp_path / "s")
    with pytest.raises(SamplingError, match="sample index missing"):
        read_index(tmp_path / "none")


def test_base_model_sampling_on_sdxl(tiny_sdxl_dir, tasks_file, tmp_path):
    timings = sample_after_task(
        tasks_file=tasks_file,
        task_index=None,
        state_dir=None,
        method_name=None,
        method_params=None,
        sampling={**SAMPLING, "num_samples": 1},
        model_source=str(tiny_sdxl_dir),
        vae=None,
        output_dir=tmp_path / "base",
        identity={"model": "base", "method": "base", "domain": "objects", "order": "", "seed": "", "after_task": 0},
    )
    frame = read_index(tmp_path / "base")
    assert timings["images"] == len(frame) == 2 * 3  # both tasks, 2 prompts and the class prompt, 1 noise
    assert set(frame["after_task"]) == {0} and list(frame["concept"].unique()) == ["concept1", "concept2"]
