"""The miniature world: what it holds, its bad input, its atomic builds, and its encoders' identity."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from lorachain.world import scene
from lorachain.world.corpus import build_corpus
from lorachain.world.ids import world_id
from lorachain.world.spec import WorldError, build_spec, check_world_block


def test_concepts_are_new_identities_and_names_the_base_never_saw():
    spec = build_spec({})
    pretraining = {(i.shape, i.colour, i.marking, i.marking_colour) for i in spec.instances}
    concepts = {(c.shape, c.colour, c.marking, c.marking_colour) for c in spec.object_concepts}
    assert not pretraining & concepts
    assert len({c.shape for c in spec.object_concepts}) == len(spec.object_concepts)  # different prior classes
    style_looks = {(s.palette, s.texture) for s in spec.styles}
    assert not style_looks & {(s.palette, s.texture) for s in spec.style_concepts}
    corpus = build_corpus(spec, 400)
    words = {word for caption in corpus.captions for word in caption.split()}
    assert not words & {"sks", "zwz", "sbu", "uwu", "byzantine", "dapple", "pastel", "winter"}
    assert {"class", "instance", "styled"} == set(corpus.kinds)


def test_the_corpus_is_a_pure_function_of_the_spec():
    spec = build_spec({"seed": 3})
    first, second = build_corpus(spec, 64), build_corpus(spec, 64)
    assert hashlib.sha256(first.images.tobytes()).digest() == hashlib.sha256(second.images.tobytes()).digest()
    assert first.captions == second.captions
    assert build_corpus(build_spec({"seed": 4}), 64).captions != first.captions


@pytest.mark.parametrize(
    ("block", "key"),
    [
        ({"resolution": 36}, "world.resolution"),
        ({"concepts": {"styles": 12}}, "world.concepts.styles"),
        ({"concepts": {"objects": 40}}, "world.concepts.objects"),
        ({"instances": 5000}, "world.instances"),
    ],
)
def test_a_world_that_cannot_be_built_names_the_key(block, key):
    problems = check_world_block(block)
    assert problems and key in problems[0]
    with pytest.raises(WorldError, match=key.replace(".", r"\.")):
        build_spec(block)


def test_the_world_id_ignores_how_long_models_train():
    assert world_id({"seed": 0}) == world_id({"seed": 0, "pretrain": {"unet_steps": 5}})
    assert world_id({"seed": 0}) != world_id({"seed": 1})


def test_a_build_that_dies_leaves_no_complete_looking_model(tmp_path, monkeypatch):
    from lorachain.world import jobs, pretrain

    def dies(spec, settings, output_dir):
        Path(output_dir, "model_index.json").parent.mkdir(parents=True, exist_ok=True)
        Path(output_dir, "model_index.json").write_text("{}")
        raise RuntimeError("killed half-way")

    monkeypatch.setattr(pretrain, "pretrain_pipeline", dies)
    target = tmp_path / "world" / "pipeline"
    with pytest.raises(RuntimeError, match="half-way"):
        jobs.pretrain_world_job(world={}, pretrain={}, output_dir=target)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_concept_datasets_read_as_the_real_layouts(tmp_path):
    from lorachain.data.selection import select_object_tasks, select_style_tasks
    from lorachain.world.jobs import world_data_job

    world_data_job(world={"concepts": {"objects": 4, "styles": 3}}, objects=tmp_path / "o", styles=tmp_path / "s")
    objects = select_object_tasks(tmp_path / "o", num_tasks=3)
    assert objects[0].train_prompt == f"a photo of sks {objects[0].class_name}"
    assert objects[0].class_name in scene.CLASSES and len(objects[0].train_images) == 5
    styles = select_style_tasks(tmp_path / "s", num_tasks=3)
    assert styles[0].train_prompt.split(" image of ")[1] in {scene.PLURALS[s] for s in scene.CLASSES}


def test_an_encoder_from_another_world_is_refused_naming_the_file(tmp_path):
    import argparse

    from lorachain.files import write_built_marker
    from lorachain.metrics.encoders import EncoderError, load_encoder, save_csd_checkpoint, save_tiny_encoder

    dino = save_tiny_encoder("dino", tmp_path / "dino")
    write_built_marker(dino, "world", world=world_id({"seed": 1}))
    with pytest.raises(EncoderError, match=rf"{dino}.*trained on world {world_id({'seed': 1})}.*delete"):
        load_encoder("dino", {"pretrained": str(dino), "world": world_id({"seed": 0})})
    assert load_encoder("dino", {"pretrained": str(dino), "world": world_id({"seed": 1})}).dim == 32

    checkpoint = save_tiny_encoder("csd", tmp_path / "csd")
    with pytest.raises(EncoderError, match=rf"{checkpoint} was not trained on a world"):
        load_encoder("csd", {"checkpoint": str(checkpoint), "world": world_id({})})
    model = load_encoder("csd", {"checkpoint": str(checkpoint)}).model
    save_csd_checkpoint(model, checkpoint, argparse.Namespace(world=world_id({})))
    assert load_encoder("csd", {"checkpoint": str(checkpoint), "world": world_id({})}).dim == 32


def test_world_objects_are_large_and_centred_unlike_the_synthetic_datasets():
    """At 32 px the datasets' small, freely placed shapes stayed blobs after 600 pretraining steps;
    the world draws its objects large and near the centre (docs/world.md#status)."""
    from lorachain.data.synthetic import _shape_mask as synthetic_mask

    def area_and_offset(mask_of):
        masks = [mask_of("square", 32, np.random.default_rng(seed))[..., 0] for seed in range(20)]
        areas = [mask.mean() for mask in masks]
        offsets = [np.abs(np.array(np.nonzero(mask > 0.5)).mean(axis=1) - 15.5).max() for mask in masks]
        return min(areas), max(offsets)

    world_area, world_offset = area_and_offset(scene._shape_mask)
    synthetic_area, _ = area_and_offset(synthetic_mask)
    assert world_area > 0.15 and world_offset < 2.5  # a square of circumradius >= 0.3 of the side, centred
    assert synthetic_area < 0.1  # the datasets keep their own geometry


def test_a_change_of_the_worlds_contents_version_changes_its_id(monkeypatch):
    from lorachain.world import ids

    before = world_id({"seed": 0})
    monkeypatch.setattr(ids, "CONTENTS_VERSION", ids.CONTENTS_VERSION + 1)
    assert ids.world_id({"seed": 0}) != before


def test_renders_differ_by_marking():
    rng = np.random.default_rng(0)
    plain = scene.render_object("star", "red", "grey", 64, np.random.default_rng(0))
    marked = scene.render_object("star", "red", "grey", 64, rng, "dot", "blue")
    assert np.abs(plain - marked).max() > 100


# ------------------------------------------------------------------------- built by its rules

ROOT = Path(__file__).resolve().parents[1]
REDUCED_WORLD = {
    "seed": 0,
    "instances": 16,
    "styles": 4,
    "concepts": {"objects": 4, "styles": 4},
    "images_per_concept": 4,
    "pretrain": {"corpus": 128, "vae_steps": 3, "vae_batch_size": 4, "unet_steps": 3, "unet_batch_size": 4},
    "encoders": {name: {"steps": 2, "batch_size": 4} for name in ("dino", "clip", "csd")},
}


def _snakemake(*args, workdir: Path):
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*command, *args], cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)


@pytest.mark.slow
def test_the_world_rules_build_a_reduced_world_that_loads_through_the_real_path(tmp_path):
    """The rules are the source of truth: a reduced world (a few steps each) is built by them, its
    models load as a config names them (directories, a CSD checkpoint), carry the world's id, and
    the experiments of config/world.yaml are planned on them."""
    import json

    import yaml

    from lorachain.files import BUILT_MARKER
    from lorachain.metrics.encoders import load_encoder
    from lorachain.models.loading import load_pipeline

    config = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    config["world"] = REDUCED_WORLD
    config["domains"]["objects"].update(num_tasks=2, task_pool=3)
    config["domains"]["styles"]["num_tasks"] = 2
    config["modular"].update(concepts=2, merge_sizes=[1, 2])
    config["compositions"]["together"]["groups"] = [[1, 2]]  # 2 objects
    path = tmp_path / "world.yaml"
    path.write_text(yaml.safe_dump(config))
    result = _snakemake("resources/world/evaluation.json", "--cores", "2", f"--configfile={path}", workdir=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    world = tmp_path / "resources" / "world"
    evaluation = json.loads((world / "evaluation.json").read_text())
    assert evaluation["world"] == world_id(REDUCED_WORLD)
    assert set(evaluation) == {"world", "base", "dino", "clip", "csd"}
    # Class recognition on samples comes with its ceiling: the classifier's accuracy on renders.
    assert 0.0 <= evaluation["base"]["classifier_on_renders"] <= 1.0
    assert "chance" in (world / "evaluation.md").read_text()
    assert not list(world.rglob("*.partial"))
    pipe = load_pipeline(str(world / "pipeline"))
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert json.loads((world / "pipeline" / BUILT_MARKER).read_text())["world"] == world_id(REDUCED_WORLD)
    assert load_encoder("csd", {"checkpoint": str(world / "csd" / "checkpoint.pth"), "world": world_id(REDUCED_WORLD)})
    with pytest.raises(Exception, match="trained on world"):
        load_encoder("dino", {"pretrained": str(world / "dino"), "world": world_id({"seed": 9})})

    plan = _snakemake("-n", "--cores", "2", f"--configfile={path}", workdir=tmp_path)
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert "train_task" in plan.stdout and "pretrain_world" not in plan.stdout  # the world is cached


def test_eval_prompts_come_from_the_config_and_need_the_placeholder(tmp_path):
    from lorachain.data.datasets import DatasetError
    from lorachain.data.domains import select_domain_tasks
    from lorachain.world.jobs import world_data_job

    world_data_job(world={"concepts": {"objects": 3, "styles": 2}}, objects=tmp_path / "o", styles=tmp_path / "s")
    block = {"num_tasks": 2, "eval_prompts": ["a {} on a grey background"]}
    tasks = select_domain_tasks("dreambooth", tmp_path / "o", block, domain="objects")
    assert tasks[0].eval_prompts == (f"a sks {tasks[0].class_name} on a grey background",)
    with pytest.raises(DatasetError, match=r"domains\.objects\.eval_prompts: 'a photo' must hold"):
        select_domain_tasks("dreambooth", tmp_path / "o", {"num_tasks": 2, "eval_prompts": ["a photo"]}, "objects")


def test_an_eval_prompt_without_the_placeholder_fails_the_config_check():
    import yaml

    from lorachain.config_checks import domain_problems

    config = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    assert domain_problems(config) == []
    config["domains"]["styles"]["eval_prompts"] = ["{} image of a star", "an image of a ring"]
    assert domain_problems(config) == [
        "config key domains.styles.eval_prompts: 'an image of a ring' must hold the concept placeholder {} exactly once"
    ]


def test_the_findings_overlay_adds_runs_and_the_ablations_to_the_demo(tmp_path):
    """config/world.yaml, read after config/demo.yaml, plans the demo's experiments over three task
    orders with BlockLoRA's ablations; the world is the demo's, so it is built once for both."""
    import re

    demo = _snakemake("-n", "--configfile", str(ROOT / "config" / "demo.yaml"), workdir=tmp_path)
    findings = _snakemake(
        "-n", "--configfile", str(ROOT / "config" / "demo.yaml"), str(ROOT / "config" / "world.yaml"), workdir=tmp_path
    )
    assert demo.returncode == 0 and findings.returncode == 0, demo.stderr[-2000:] + findings.stderr[-2000:]

    def counts(output: str) -> dict[str, int]:
        table = output[output.index("Job stats") :]
        return {rule: int(n) for rule, n in re.findall(r"^(\w+)\s+(\d+)$", table, flags=re.M)}

    demo, findings = counts(demo.stdout), counts(findings.stdout)
    assert findings["train_task"] == 3 * demo["train_task"] == 3 * 2 * 4 * 3
    # three ablation adapters and ED-LoRA (LoRA + token embeddings), on the 3 objects and on the mixed set's 3
    assert findings["train_concept"] == demo["train_concept"] + 4 * (3 + 3)
    assert findings["modular_ablation"] == 2 and "modular_ablation" not in demo  # Table 3's layout, per set
    assert findings["pretrain_world"] == demo["pretrain_world"] == 1


@pytest.mark.parametrize("encoder", ["dino", "clip", "csd"])
def test_an_encoder_built_twice_is_byte_identical(tmp_path, encoder):
    """Same world block, same training: the same file (its initial weights are seeded)."""
    from lorachain.world.jobs import train_world_encoder_job

    training = {"steps": 2, "batch_size": 4}
    digests = []
    for attempt in ("a", "b"):
        output = tmp_path / attempt / ("checkpoint.pth" if encoder == "csd" else encoder)
        train_world_encoder_job(world=REDUCED_WORLD, encoder=encoder, training=training, output=output)
        weights = output if encoder == "csd" else output / "model.safetensors"
        digests.append(hashlib.sha256(weights.read_bytes()).hexdigest())
    assert digests[0] == digests[1]
