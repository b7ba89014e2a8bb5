"""``lorachain train | sample | merge``: one experiment by hand gives what the workflow's jobs give.

Each command is checked against the library entry point its workflow job calls, with the arguments
the workflow derives from a config validated by the workflow's own schema: the same bytes in every
state file (manifest, LoRA, losses), the same sample sets; and bad input gives the workflow's
errors, with exit code 2.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from lorachain.cli import main
from lorachain.data.selection import Task, write_tasks

SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"
TRAINING = {"rank": 4, "lora_alpha": 4, "steps": 3, "learning_rate": 1.0e-3, "resolution": 32, "batch_size": 2}
TRAINING_FLAGS = ["--rank", "4", "--alpha", "4", "--steps", "3", "--lr", "1e-3", "--resolution", "32"]
TRAINING_FLAGS += ["--batch-size", "2"]
SAMPLING = {"num_samples": 1, "steps": 2, "resolution": 32, "batch_size": 4}
SAMPLING_FLAGS = ["--num-samples", "1", "--steps", "2", "--resolution", "32", "--batch-size", "4"]
STATE_FILES = ("state.json", "pytorch_lora_weights.safetensors", "loss.csv")


@pytest.fixture(autouse=True)
def restore_threads(monkeypatch):
    """The commands hold torch to --threads (1) as a job is held; the rest of the session keeps its own."""
    from lorachain.torch_env import torch

    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(variable, raising=False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def workflow_blocks(model, **blocks) -> dict:
    """A workflow config holding these blocks, validated (defaults filled in) by the workflow's
    schema, as the Snakefile validates it: what the jobs' params are derived from."""
    import copy

    from lorachain.config_checks import validate_config

    config = copy.deepcopy(
        {
            "model": {"pretrained": str(model)},
            "domains": {"objects": {"dataset": {"layout": "dreambooth", "root": "data"}, "num_tasks": 3}},
            "methods": {"naive": {"method": "naive"}},
            "training": dict(TRAINING),
            "sampling": dict(SAMPLING),
            **blocks,
        }
    )
    validate_config(config, SCHEMA)
    return config


def hand_task(subject: str, prompt: str, images: list[str]) -> Task:
    """The task `--images DIR --prompt TEXT --concept SUBJECT` stands for."""
    return Task(subject, "object", None, subject, tuple(images), prompt, (prompt,), tuple(images))


def digests(directory: Path) -> dict[str, str]:
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in STATE_FILES}


def sample_set(directory: Path) -> dict[str, bytes]:
    return {str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*.*"))}


def cli(*args) -> None:
    assert main([str(arg) for arg in args]) == 0


def cli_error(capsys, *args) -> str:
    """The error line(s) of a command that must fail with exit code 2."""
    capsys.readouterr()
    assert main([str(arg) for arg in args]) == 2
    err = capsys.readouterr().err
    command = args[0]
    assert err.startswith(f"lorachain {command}: error: "), err
    return err


# ------------------------------------------------------------------------------ a chain by hand


@pytest.mark.slow
def test_three_task_chain_by_hand_equals_the_workflow_jobs(tiny_sd1_dir, synthetic_tasks, tmp_path):
    from lorachain import plan
    from lorachain.sample import sample_state_job
    from lorachain.train import train_task_job

    subjects = ["backpack", "teapot", "colorful_sneaker"]
    tasks = [hand_task(s, prompt, images) for s, (prompt, images) in zip(subjects, synthetic_tasks)]
    for index, (subject, (prompt, images)) in enumerate(zip(subjects, synthetic_tasks), start=1):
        previous = ["--previous", tmp_path / f"cli/task{index - 1:02d}"] if index > 1 else []
        first = ["--model", tiny_sd1_dir, "--method", "naive", "--seed", 7] if index == 1 else []
        folder = Path(images[0]).parent
        cli(
            "train",
            *first,
            *previous,
            *TRAINING_FLAGS,
            "--images",
            folder,
            "--prompt",
            prompt,
            "--concept",
            subject,
            "--out",
            tmp_path / f"cli/task{index:02d}",
        )

    config = workflow_blocks(tiny_sd1_dir)
    write_tasks(tmp_path / "tasks.json", tasks)
    run = {"method": "naive", "seed": 7}
    for index in (1, 2, 3):
        out = tmp_path / f"lib/task{index:02d}"
        train_task_job(
            tasks=tmp_path / "tasks.json",
            task_index=index,
            previous_dir=None if index == 1 else tmp_path / f"lib/task{index - 1:02d}",
            method="naive",
            method_params={},
            training=plan.training_block(config),
            checkpoint_every=config["training"]["checkpoint_every"],
            tracking=config["training"]["tracking"],
            model=str(tiny_sd1_dir),
            vae=None,
            run=run,
            seed=7,
            state=out / "state.json",
            lora=out / "pytorch_lora_weights.safetensors",
            loss=out / "loss.csv",
        )
        assert digests(tmp_path / f"cli/task{index:02d}") == digests(out), f"task {index}"

    cli("sample", tmp_path / "cli/task03", *SAMPLING_FLAGS, "--out", tmp_path / "cli-samples")
    sample_state_job(
        tasks=tmp_path / "tasks.json",
        task_index=3,
        state_dir=tmp_path / "lib/task03",
        method="naive",
        method_params={},
        sampling={**plan.stage_block(config, "sampling"), "prior_samples": False},
        model=str(tiny_sd1_dir),
        vae=None,
        run=run,
        samples=tmp_path / "lib-samples",
    )
    ours, theirs = sample_set(tmp_path / "cli-samples"), sample_set(tmp_path / "lib-samples")
    assert sorted(ours) == ["index.csv", "task01/p0-n0.png", "task02/p0-n0.png", "task03/p0-n0.png"]
    assert ours == theirs


@pytest.mark.slow
def test_chain_on_a_workflow_task_file_and_config(tiny_sd1_dir, synthetic_dataset, tmp_path):
    """--config with a workflow config and --domain: the task file and run identity of the workflow."""
    import yaml

    from lorachain import plan
    from lorachain.data.domains import prepare_tasks_job
    from lorachain.train import train_task_job

    objects = {"dataset": {"layout": "dreambooth", "root": str(synthetic_dataset)}, "num_tasks": 3}
    blocks = {"model": {"pretrained": str(tiny_sd1_dir)}, "domains": {"objects": objects}, "training": TRAINING}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(blocks))
    config = workflow_blocks(tiny_sd1_dir, domains={"objects": objects})
    cli(
        "train",
        "--config",
        tmp_path / "config.yaml",
        "--domain",
        "objects",
        "--method",
        "naive",
        "--out",
        tmp_path / "cli/task01",
    )

    tasks = tmp_path / "tasks/order0.json"
    prepare_tasks_job(
        layout="dreambooth",
        root=str(synthetic_dataset),
        selection=plan.selection_block(config, "objects"),
        order=0,
        domain="objects",
        tasks=tasks,
    )
    out = tmp_path / "lib/task01"
    train_task_job(
        tasks=tasks,
        task_index=1,
        previous_dir=None,
        method="naive",
        method_params={},
        training=plan.training_block(config),
        checkpoint_every=config["training"]["checkpoint_every"],
        tracking=config["training"]["tracking"],
        model=str(tiny_sd1_dir),
        vae=None,
        run={"domain": "objects", "method": "naive", "order": 0, "seed": 0},
        seed=0,
        state=out / "state.json",
        lora=out / "pytorch_lora_weights.safetensors",
        loss=out / "loss.csv",
    )
    assert digests(tmp_path / "cli/task01") == digests(out)


# ------------------------------------------------------------------------------ merge


@pytest.mark.slow
def test_merge_of_two_concepts_equals_the_workflow_jobs(tiny_sd1_dir, synthetic_tasks, tmp_path):
    from lorachain import plan
    from lorachain.modular import merge_and_sample_job, train_concept_job

    pairs = list(zip(["backpack", "teapot"], synthetic_tasks))
    for slot, (subject, (prompt, images)) in enumerate(pairs):
        cli(
            "train",
            "--model",
            tiny_sd1_dir,
            "--method",
            "naive",
            "--slot",
            slot,
            *TRAINING_FLAGS,
            "--images",
            Path(images[0]).parent,
            "--prompt",
            prompt,
            "--concept",
            subject,
            "--out",
            tmp_path / f"cli/concept{slot + 1:02d}",
        )
    cli(
        "merge",
        tmp_path / "cli/concept01",
        tmp_path / "cli/concept02",
        "--merge",
        "weighted_average",
        "--prompt",
        "a photo of {}",
        "--prompt",
        "{} in the snow",
        *SAMPLING_FLAGS,
        "--out",
        tmp_path / "cli/merge",
    )

    config = workflow_blocks(tiny_sd1_dir)
    write_tasks(tmp_path / "tasks.json", [hand_task(s, prompt, images) for s, (prompt, images) in pairs])
    run = {"method": "naive", "regime": "modular", "seed": 0}
    for index in (1, 2):
        out = tmp_path / f"lib/concept{index:02d}"
        train_concept_job(
            tasks=tmp_path / "tasks.json",
            concept_index=index,
            method="naive",
            method_params={},
            training=plan.training_block(config),
            checkpoint_every=config["training"]["checkpoint_every"],
            tracking=config["training"]["tracking"],
            model=str(tiny_sd1_dir),
            vae=None,
            seed=0,
            run=run,
            state=out / "state.json",
            lora=out / "pytorch_lora_weights.safetensors",
            loss=out / "loss.csv",
        )
        assert digests(tmp_path / f"cli/concept{index:02d}") == digests(out), f"concept {index}"
    merge_and_sample_job(
        tasks=tmp_path / "tasks.json",
        grams=[],
        method="weighted_average",
        merge_params={},
        concept_dirs=[tmp_path / "lib/concept01", tmp_path / "lib/concept02"],
        sampling={**plan.stage_block(config, "sampling"), "prior_samples": False},
        model=str(tiny_sd1_dir),
        vae=None,
        identity={
            "model": "weighted_average",
            "method": "weighted_average",
            "domain": "",
            "order": "",
            "seed": 0,
            "after_task": 2,
        },
        merge="weighted_average",
        samples=tmp_path / "lib/merge/samples",
        record=tmp_path / "lib-merge.json",
        eval_prompts={"object": ["a photo of {}", "{} in the snow"]},
    )
    ours = sample_set(tmp_path / "cli/merge/samples")
    assert len(ours) == 1 + 2 * 2 and ours == sample_set(tmp_path / "lib/merge/samples")
    assert b"a photo of colorful sneaker" not in ours["index.csv"] and b"teapot in the snow" in ours["index.csv"]
    assert (tmp_path / "cli/merge/merge.json").is_file()

    cli(
        "merge",
        tmp_path / "cli/concept01",
        tmp_path / "cli/concept02",
        "--merge",
        "weighted_average",
        "--export",
        tmp_path / "exported",
        "--no-sample",
    )
    record = json.loads((tmp_path / "exported/export.json").read_text())
    assert record["method"]["name"] == "weighted_average" and record["exact"]
    assert not (tmp_path / "exported/samples").exists()


# ------------------------------------------------------------------------------ errors


# The rest of a workflow config: the CLI's blocks are checked as they are checked in one.
WORKFLOW = {
    "domains": {"objects": {"dataset": {"layout": "dreambooth", "root": "data"}, "num_tasks": 3}},
    "methods": {"naive": {"method": "naive"}},
    "training": {},
}


def schema_error(config: dict) -> str:
    """The line of the workflow's schema error for `config` (what the dry-run prints)."""
    from lorachain.config_checks import validate_config

    with pytest.raises(Exception) as caught:
        validate_config(config, SCHEMA)
    return next(line for line in str(caught.value).splitlines() if line.startswith("ValidationError"))


def test_an_unknown_method_is_the_workflow_error(tiny_sd1_dir, synthetic_images, capsys, tmp_path):
    expected = schema_error(
        {**WORKFLOW, "model": {"pretrained": str(tiny_sd1_dir)}, "methods": {"nope": {"method": "nope"}}}
    )
    err = cli_error(
        capsys,
        "train",
        "--model",
        tiny_sd1_dir,
        "--method",
        "nope",
        "--images",
        Path(synthetic_images[0]).parent,
        "--prompt",
        "a photo of sks backpack",
        "--out",
        tmp_path / "t",
    )
    assert expected in err and "'nope' is not one of" in err
    assert not (tmp_path / "t").exists()


def test_a_typo_in_the_config_file_is_the_workflow_error(tiny_sd1_dir, synthetic_images, capsys, tmp_path):
    import yaml

    blocks = {"model": {"pretrained": str(tiny_sd1_dir)}, "training": {"stpes": 3}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(blocks))
    expected = schema_error({**WORKFLOW, **blocks})
    err = cli_error(
        capsys,
        "train",
        "--config",
        tmp_path / "config.yaml",
        "--method",
        "naive",
        "--images",
        Path(synthetic_images[0]).parent,
        "--prompt",
        "a photo of sks backpack",
        "--out",
        tmp_path / "t",
    )
    assert expected in err and "'stpes' was unexpected" in err


def test_a_missing_previous_state_names_the_flag_and_the_file(synthetic_images, capsys, tmp_path):
    from lorachain.state import StateError, read_manifest

    (tmp_path / "task01").mkdir()  # a task that did not finish: no manifest
    with pytest.raises(StateError) as library:
        read_manifest(tmp_path / "task01")
    err = cli_error(
        capsys,
        "train",
        "--previous",
        tmp_path / "task01",
        "--images",
        Path(synthetic_images[0]).parent,
        "--prompt",
        "a photo of sks backpack",
        "--out",
        tmp_path / "task02",
    )
    assert f"--previous {tmp_path / 'task01'}: {library.value}" in err


def test_usage_errors_name_the_flag(tiny_sd1_dir, capsys, tmp_path):
    err = cli_error(capsys, "train", "--model", tiny_sd1_dir, "--method", "naive", "--out", tmp_path / "t")
    assert "give --images DIR and --prompt TEXT" in err
    err = cli_error(
        capsys,
        "train",
        "--model",
        tiny_sd1_dir,
        "--method",
        "naive",
        "--images",
        tmp_path / "none",
        "--prompt",
        "x",
        "--out",
        tmp_path / "t",
    )
    assert f"--images {tmp_path / 'none'}: no such directory" in err
    err = cli_error(capsys, "sample", "--model", tiny_sd1_dir, "--out", tmp_path / "s")
    assert "the base model needs prompts" in err
    err = cli_error(capsys, "merge", tmp_path / "absent", "--merge", "ties", "--out", tmp_path / "m")
    assert f"{tmp_path / 'absent'}: no such concept directory" in err
    err = cli_error(capsys, "train", "--config", tmp_path / "absent.yaml", "--method", "naive", "--out", tmp_path / "t")
    assert "--config" in err and "no such file" in err


@pytest.mark.slow
def test_sampling_the_base_model_on_a_task_file_equals_the_workflow_job(tiny_sd1_dir, synthetic_tasks, tmp_path):
    from lorachain import plan
    from lorachain.sample import sample_base_job

    tasks = [hand_task(s, p, images) for s, (p, images) in zip(["backpack", "teapot"], synthetic_tasks)]
    write_tasks(tmp_path / "tasks.json", tasks)
    cli(
        "sample",
        "--model",
        tiny_sd1_dir,
        "--tasks",
        tmp_path / "tasks.json",
        *SAMPLING_FLAGS,
        "--out",
        tmp_path / "cli",
    )
    config = workflow_blocks(tiny_sd1_dir)
    sample_base_job(
        tasks=tmp_path / "tasks.json",
        sampling=plan.stage_block(config, "sampling"),
        model=str(tiny_sd1_dir),
        vae=None,
        domain="",
        samples=tmp_path / "lib",
    )
    ours = sample_set(tmp_path / "cli")
    assert "task02/prior-n0.png" in ours and ours == sample_set(tmp_path / "lib")
