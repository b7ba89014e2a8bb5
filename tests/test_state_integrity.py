"""A finished task's files are checked when a state is read: a damaged or swapped LoRA is refused,
naming the file, what differs and the directory to delete; and identical runs write identical bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from lorachain.files import sha256_file
from lorachain.methods import LayerAdapter, make_method
from lorachain.state import (
    LORA_FILE,
    STATE_FILE,
    StateError,
    fold_state,
    load_adapters,
    read_manifest,
    write_task_state,
)
from lorachain.torch_env import torch

LAYERS = {"down.attn1.to_q": (8, 6), "down.attn1.to_k": (8, 6), "up.attn2.to_v": (6, 8)}  # name -> (out, in)


def lora_config(rank: int) -> dict:
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]).to_dict()


def write_state(directory: Path, rank: int = 4, seed: int = 0) -> Path:
    from diffusers import StableDiffusionPipeline

    generator = torch.Generator().manual_seed(seed)
    adapters = {
        name: LayerAdapter(
            A=torch.randn(rank, n_in, generator=generator), B=torch.randn(n_out, rank, generator=generator), scale=1.0
        )
        for name, (n_out, n_in) in LAYERS.items()
    }
    manifest = {
        "task_index": 1,
        "parent": None,
        "method": {"name": "naive", "params": {}},
        "run": {},
        "base_model": "m",
        "architecture": "StableDiffusionPipeline",
        "rank": rank,
        "lora_alpha": rank,
    }
    write_task_state(directory, adapters, manifest, StableDiffusionPipeline, lora_config(rank))
    return directory


def rewrite_lora(directory: Path, tensors: dict, update_manifest: bool) -> None:
    """Replace the LoRA file; with `update_manifest` also its recorded bytes and sha256, as a state
    written by a faulty writer (or a format-1 state without a digest) would have."""
    save_file(tensors, str(directory / LORA_FILE))
    if update_manifest:
        manifest = json.loads((directory / STATE_FILE).read_text())
        manifest["bytes"]["lora"] = (directory / LORA_FILE).stat().st_size
        manifest["sha256"]["lora"] = sha256_file(directory / LORA_FILE)
        (directory / STATE_FILE).write_text(json.dumps(manifest))


def refused(directory: Path) -> str:
    with pytest.raises(StateError) as error:
        fold_state(directory, make_method("naive"))
    message = str(error.value)
    assert str(directory / LORA_FILE) in message
    assert f"delete the directory {directory.absolute()} and rerun the workflow" in message
    return message


def test_the_manifest_records_bytes_and_sha256_and_a_sound_state_loads(tmp_path):
    directory = write_state(tmp_path / "task01")
    manifest = read_manifest(directory)
    assert manifest["bytes"]["lora"] == (directory / LORA_FILE).stat().st_size
    assert manifest["sha256"]["lora"] == sha256_file(directory / LORA_FILE)
    assert manifest["layers"] == len(LAYERS)
    assert sorted(load_adapters(directory, manifest)) == sorted(LAYERS)


def test_a_truncated_lora_is_refused_naming_the_sizes(tmp_path):
    directory = write_state(tmp_path / "task01")
    size = (directory / LORA_FILE).stat().st_size
    with open(directory / LORA_FILE, "r+b") as handle:
        handle.truncate(size // 2)
    message = refused(directory)
    assert f"{size // 2} bytes, but {directory / STATE_FILE} recorded {size} bytes" in message


def test_a_changed_lora_of_the_same_size_is_refused_by_its_sha256(tmp_path):
    directory = write_state(tmp_path / "task01")
    data = bytearray((directory / LORA_FILE).read_bytes())
    data[-1] ^= 0xFF  # one bit-flipped byte of a tensor
    (directory / LORA_FILE).write_bytes(bytes(data))
    assert "sha256" in refused(directory)


def test_an_unreadable_file_with_matching_records_is_refused_by_name(tmp_path):
    directory = write_state(tmp_path / "task01")
    (directory / LORA_FILE).write_bytes(b"not safetensors at all")
    manifest = json.loads((directory / STATE_FILE).read_text())
    manifest["bytes"]["lora"], manifest["sha256"]["lora"] = 22, sha256_file(directory / LORA_FILE)
    (directory / STATE_FILE).write_text(json.dumps(manifest))
    assert "not a readable safetensors file" in refused(directory)


def test_a_missing_lora_b_key_is_refused_by_name(tmp_path):
    directory = write_state(tmp_path / "task01")
    tensors = load_file(str(directory / LORA_FILE))
    tensors.pop("unet.down.attn1.to_k.lora_B.weight")
    rewrite_lora(directory, tensors, update_manifest=True)
    assert "key 'unet.down.attn1.to_k.lora_A.weight' has no matching 'unet.down.attn1.to_k.lora_B.weight'" in refused(
        directory
    )


def test_a_lora_of_another_rank_than_the_manifest_is_refused(tmp_path):
    directory = write_state(tmp_path / "task01", rank=4)
    other = write_state(tmp_path / "rank8", rank=8)
    rewrite_lora(directory, load_file(str(other / LORA_FILE)), update_manifest=True)
    message = refused(directory)
    assert "records rank 4" in message and "(8, 6)" in message


def test_a_lora_with_fewer_layers_than_the_manifest_is_refused(tmp_path):
    directory = write_state(tmp_path / "task01")
    tensors = {k: v for k, v in load_file(str(directory / LORA_FILE)).items() if ".to_q." not in k}
    rewrite_lora(directory, tensors, update_manifest=True)
    assert f"2 LoRA layers, but {directory / STATE_FILE} records 3" in refused(directory)


# ---------------------------------------------------------------------------- reproducibility

CHAIN_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from lorachain.torch_env import torch
    from lorachain.train import train_task

    torch.set_num_threads(1)
    base, out, tasks = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    previous = None
    for index, (prompt, images) in enumerate(tasks, start=1):
        task_dir = out / f"task{index:02d}"
        train_task(
            model_source=base, train_images=images, train_prompt=prompt, task_index=index, previous_state=previous,
            method_name="merge_init", method_params={}, seed=0, output_dir=task_dir, concept=f"c{index}",
            training=dict(
                rank=4, lora_alpha=4, steps=4, learning_rate=1e-3, resolution=64, batch_size=2, checkpoint_every=2
            ),
            run={"method": "merge_init", "seed": 0}, loss_log=task_dir / "loss.csv", progress=False,
            tracking_dir=Path(f"{out}-logs") / task_dir.name,  # event files hold wall times: logs, as the jobs'
        )
        previous = task_dir
    """
)


def test_a_two_task_chain_is_byte_identical_across_processes_and_hash_seeds(tiny_sd1_dir, synthetic_tasks, tmp_path):
    digests = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"hash-seed-{hash_seed}"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "HF_HUB_OFFLINE": "1"}
        result = subprocess.run(
            [sys.executable, "-c", CHAIN_SCRIPT, str(tiny_sd1_dir), str(out), json.dumps(synthetic_tasks[:2])],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        digests.append(
            {str(path.relative_to(out)): sha256_file(path) for path in sorted(out.rglob("*")) if path.is_file()}
        )
    assert sorted(digests[0]) == [
        f"task{t}/{name}" for t in ("01", "02") for name in ("loss.csv", LORA_FILE, STATE_FILE)
    ]
    assert digests[0] == digests[1]
    print("\nsha256 of a two-task chain (identical under PYTHONHASHSEED 1 and 2):\n" + json.dumps(digests[0], indent=2))


def test_the_state_reader_is_the_merges_reader_in_strict_mode(tmp_path):
    """A state's LoRA is parsed by lorachain.lora (the merges' reader): its checks (finite values)
    apply to states too, and strict mode refuses what a state never holds (alpha tensors)."""
    directory = write_state(tmp_path / "task01")
    tensors = load_file(str(directory / LORA_FILE))
    tensors["unet.down.attn1.to_q.lora_B.weight"][0, 0] = float("nan")
    rewrite_lora(directory, tensors, update_manifest=True)
    assert "key 'unet.down.attn1.to_q.lora_B.weight' holds 1 non-finite value(s)" in refused(directory)
    other = write_state(tmp_path / "task02")
    tensors = load_file(str(other / LORA_FILE))
    tensors["unet.down.attn1.to_q.alpha"] = torch.tensor(4.0)
    rewrite_lora(other, tensors, update_manifest=True)
    assert "key 'unet.down.attn1.to_q.alpha' is not a LoRA factor" in refused(other)
