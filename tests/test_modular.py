"""The modular regime's library: concept training with slots, gram recording, merge-and-sample,
Table 1 / Figure 5 assembly."""

from __future__ import annotations

import importlib.metadata
import json

import pandas as pd
import pytest
from test_chain import TRAINING, factors

from lorachain import provenance
from lorachain.torch_env import torch


@pytest.fixture(scope="module")
def concepts(tiny_sd1_dir, synthetic_tasks, tmp_path_factory):
    """Three concepts trained independently with BlockLoRA (slots 0, 1, 2) and their task file."""
    from lorachain.data.selection import Task, write_tasks
    from lorachain.train import train_task

    root = tmp_path_factory.mktemp("modular")
    tasks = []
    for index, (prompt, images) in enumerate(synthetic_tasks, start=1):
        tasks.append(
            Task(
                concept=f"concept{index}",
                kind="object",
                token="sks",
                class_name="thing",
                train_prompt=prompt,
                train_images=tuple(images),
                eval_prompts=(prompt,),
                reference_images=tuple(images[:1]),
            )
        )
    write_tasks(root / "tasks.json", tasks, layout="dreambooth", dataset_root=str(root), order_seed=0)
    dirs = []
    for index, task in enumerate(tasks, start=1):
        directory = root / f"concept{index}"
        train_task(
            model_source=str(tiny_sd1_dir),
            train_images=list(task.train_images),
            train_prompt=task.train_prompt,
            task_index=1,
            slot=index - 1,
            previous_state=None,
            method_name="blocklora",
            method_params={"num_blocks": 4, "erasure": 0.25},
            training={**TRAINING, "steps": 2},
            seed=index,
            output_dir=directory,
            concept=task.concept,
            progress=False,
        )
        dirs.append(directory)
    return root, dirs


SAMPLING = {"num_samples": 1, "steps": 2, "resolution": 64, "guidance_scale": 3.0, "batch_size": 8}


def test_merge_and_sample_applies_the_exact_merged_delta(concepts, tiny_sd1_dir, tmp_path, monkeypatch):
    from lorachain import modular, state

    root, dirs = concepts
    applied = {}
    original = state.apply_to_unet

    def spy(unet, folded):
        applied.update(folded.merged)
        return original(unet, folded)

    monkeypatch.setattr(state, "apply_to_unet", spy)
    result = modular.merge_and_sample(
        concept_dirs=[str(d) for d in dirs[:2]],
        gram_files=None,
        merge_name="blocklora",
        merge_params={},
        merge_key="modular.merges.blocklora",
        tasks_file=root / "tasks.json",
        sampling=SAMPLING,
        model_source=str(tiny_sd1_dir),
        vae=None,
        output_dir=tmp_path / "samples",
        identity={
            "model": "blocklora",
            "method": "blocklora",
            "domain": "objects",
            "order": 0,
            "seed": 0,
            "after_task": 2,
        },
        merge_record=tmp_path / "merge.json",
        eval_prompts={"object": ["a {} in a jail"]},
    )
    first, second = factors(dirs[0]), factors(dirs[1])
    assert sorted(applied) == sorted(first)
    for layer, delta in applied.items():  # alpha_i = 1, BlockLoRA's default: the sum of the disjoint blocks
        assert torch.allclose(delta, first[layer].delta() + second[layer].delta(), atol=1e-7), layer
    index = pd.read_csv(tmp_path / "samples" / "index.csv")
    assert sorted(index["concept"].unique()) == ["concept1", "concept2"] and result["images"] == 2 * 2
    # the modular prompts, then each concept's class prompt (for prior drift)
    assert list(index["prompt"][:2]) == ["a sks thing in a jail", "a photo of thing"]
    record = json.loads((tmp_path / "merge.json").read_text())
    assert record["k"] == 2 and record["merge_type"] == "instant" and record["merge_s"] >= 0
    assert record["provenance"] == json.loads(json.dumps(provenance.record(str(tiny_sd1_dir))))  # the base's


def test_a_blockwise_merge_with_alpha_one_gives_each_concept_its_own_models_outputs_on_its_rows(concepts, tiny_sd1_dir):
    """BlockLoRA's merge (alpha_i = 1) of 3 concepts, applied to the U-Net: on concept i's row block
    every targeted layer outputs exactly what concept i's own model outputs there, and the rows no
    concept owns stay the base model's. Eq. 5's alpha = 1/k does not (its rows shrink by 1/k)."""
    from lorachain.methods import make_merge, make_method
    from lorachain.methods.blocklora import block_rows
    from lorachain.models.loading import load_pipeline
    from lorachain.state import FoldedState, apply_to_unet, fold_state

    _, dirs = concepts
    method = make_method("blocklora", {"num_blocks": 4, "erasure": 0.25})
    loaded = [modular_concept(d) for d in dirs]

    def unet_with(state):
        unet = load_pipeline(str(tiny_sd1_dir)).unet
        apply_to_unet(unet, state)
        return dict(unet.named_modules())

    base = unet_with(FoldedState(tasks_done=0))
    merged = unet_with(FoldedState(tasks_done=3, merged=make_merge("blocklora", {}).merge(loaded)))
    eq5 = unet_with(FoldedState(tasks_done=3, merged=make_merge("blocklora", {"weights": "mean"}).merge(loaded)))
    singles = [unet_with(fold_state(d, method)) for d in dirs]
    generator = torch.Generator().manual_seed(0)
    differs = 0
    with torch.no_grad():
        for layer in sorted(factors(dirs[0])):
            x = torch.randn(5, merged[layer].in_features, generator=generator)
            out = merged[layer](x)
            for slot, single in enumerate(singles):
                rows = block_rows(out.shape[1], 4, slot)
                assert torch.equal(out[:, rows], single[layer](x)[:, rows]), (layer, slot)
                differs += not torch.allclose(eq5[layer](x)[:, rows], single[layer](x)[:, rows])
            free = block_rows(out.shape[1], 4, 3)  # the fourth block: no concept
            assert torch.equal(out[:, free], base[layer](x)[:, free]), layer
    assert differs > 0  # the test can tell alpha = 1 from Eq. 5's 1/k


def modular_concept(directory):
    from lorachain import modular

    return modular.load_concept(directory)[0]


def test_merge_and_sample_refuses_concepts_in_another_order(concepts, tiny_sd1_dir, tmp_path):
    from lorachain import modular

    root, dirs = concepts
    with pytest.raises(modular.ModularError, match="trained on concept 'concept2', but task 1"):
        modular.merge_and_sample(
            concept_dirs=[str(dirs[1]), str(dirs[0])],
            gram_files=None,
            merge_name="weighted_average",
            merge_params={},
            merge_key="k",
            tasks_file=root / "tasks.json",
            sampling=SAMPLING,
            model_source=str(tiny_sd1_dir),
            vae=None,
            output_dir=tmp_path / "s",
            identity={},
            merge_record=tmp_path / "m.json",
        )
    with pytest.raises(modular.ModularError, match="zero concepts"):
        modular.merge_and_sample(
            concept_dirs=[],
            gram_files=None,
            merge_name="weighted_average",
            merge_params={},
            merge_key="modular.merges.x",
            tasks_file=root / "tasks.json",
            sampling=SAMPLING,
            model_source=str(tiny_sd1_dir),
            vae=None,
            output_dir=tmp_path / "s",
            identity={},
            merge_record=tmp_path / "m.json",
        )


def test_recorded_grams_let_gradient_fusion_reproduce_a_single_concept(concepts, tiny_sd1_dir, tmp_path):
    from lorachain import modular
    from lorachain.data import read_tasks
    from lorachain.merging.fusion import load_grams
    from lorachain.methods import make_merge

    root, dirs = concepts
    grams_file = tmp_path / "grams.safetensors"
    result = modular.record_layer_inputs(
        model_source=str(tiny_sd1_dir),
        vae=None,
        state_dir=dirs[0],
        method_name="blocklora",
        method_params={"num_blocks": 4, "erasure": 0.25},
        task=read_tasks(root / "tasks.json")[0],
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        resolution=64,
        timesteps=2,
        seed=0,
        output=grams_file,
        gram_dtype="float64",
    )
    grams = load_grams(grams_file)
    adapters = factors(dirs[0])
    assert sorted(grams) == sorted(adapters) and result["layers"] == len(adapters)
    for layer, (G, rows) in grams.items():
        assert G.shape == (adapters[layer].A.shape[1],) * 2 and rows > 0 and torch.allclose(G, G.T)
    concept, _ = modular.load_concept(dirs[0], with_grams=grams_file)
    fused = make_merge("gradient_fusion", {}).merge([concept])
    for layer, delta in fused.items():
        G = grams[layer][0].double()
        # on the recorded inputs the fused layer gives the concept's outputs: delta G == delta_1 G
        target = adapters[layer].delta().double() @ G
        assert torch.allclose(delta.double() @ G, target, atol=1e-4 * float(target.abs().max()) + 1e-8), layer


def _record(concepts, tiny_sd1_dir, path, recording, timesteps=2):
    from dataclasses import replace

    from lorachain import modular
    from lorachain.data import read_tasks

    root, dirs = concepts
    task = read_tasks(root / "tasks.json")[0]
    task = replace(task, train_prompt=f"a photo of {task.identifier}")  # the fixture's prompts name other classes
    return modular.record_layer_inputs(
        model_source=str(tiny_sd1_dir),
        vae=None,
        state_dir=dirs[0],
        method_name="blocklora",
        method_params={"num_blocks": 4, "erasure": 0.25},
        task=task,
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        resolution=64,
        timesteps=timesteps,
        seed=0,
        output=path,
        gram_dtype="float64",
        recording=recording,
        record=path.with_suffix(".json"),
    )


def test_mix_of_show_recording_along_a_trajectory_with_the_concepts_token_rows(concepts, tiny_sd1_dir, tmp_path):
    """Both sources record every targeted layer; `sampling` records one row set per trajectory step
    of one latent; `concept` keeps 2 token rows ("sks thing") per forward in the cross-attention K/V
    layers and every row elsewhere; the grams differ from the images' ones; each record says how."""
    from lorachain.merging.fusion import is_cross_attention_kv, load_grams

    results, grams = {}, {}
    for recording in ("images", "sampling", "sampling-concept"):
        path = tmp_path / f"grams-{recording}.safetensors"
        results[recording] = _record(concepts, tiny_sd1_dir, path, recording, timesteps=3)
        grams[recording] = load_grams(path)
        assert json.loads(path.with_suffix(".json").read_text())["recording"] == recording
    assert sorted(grams["images"]) == sorted(grams["sampling"]) == sorted(grams["sampling-concept"])
    cross = [layer for layer in grams["sampling"] if is_cross_attention_kv(layer)]
    assert cross and results["sampling-concept"]["restricted_layers"] == len(cross)
    for layer in cross:
        full, restricted = grams["sampling"][layer][1], grams["sampling-concept"][layer][1]
        assert full == 3 * 77 and restricted == 3 * 2  # 3 steps x (77 tokens | the concept's 2)
    for layer in grams["sampling"]:
        if not is_cross_attention_kv(layer):  # the same trajectory: spatial layers agree exactly
            assert torch.equal(grams["sampling"][layer][0], grams["sampling-concept"][layer][0])
    spatial = next(layer for layer in grams["images"] if not is_cross_attention_kv(layer))
    assert not torch.allclose(grams["images"][spatial][0], grams["sampling"][spatial][0])


def test_a_merge_records_its_concepts_recording_time_and_refuses_another_recording(concepts, tiny_sd1_dir, tmp_path):
    from lorachain import modular

    root, dirs = concepts
    grams = tmp_path / "grams-images.safetensors"
    _record(concepts, tiny_sd1_dir, grams, "images")
    recorded = json.loads(grams.with_suffix(".json").read_text())["total_s"]
    common = dict(
        concept_dirs=[dirs[0]],
        gram_files=[grams],
        merge_name="gradient_fusion",
        merge_key="modular.merges.gf",
        tasks_file=root / "tasks.json",
        sampling=SAMPLING,
        model_source=str(tiny_sd1_dir),
        vae=None,
        identity={"model": "gf", "method": "gradient_fusion", "domain": "d", "order": 0, "seed": 0, "after_task": 1},
    )
    modular.merge_and_sample(
        **common,
        merge_params={},
        output_dir=tmp_path / "samples",
        merge_record=tmp_path / "m.json",
        gram_records=[grams.with_suffix(".json")],
    )
    record = json.loads((tmp_path / "m.json").read_text())
    assert record["record_s"] == pytest.approx(recorded) and record["merge_type"] == "post-training (closed form)"
    with pytest.raises(modular.ModularError, match="recorded as 'images', but modular.merges.gf asks for 'sampling'"):
        modular.merge_and_sample(
            **common,
            merge_params={"inputs": "sampling"},
            output_dir=tmp_path / "other",
            merge_record=tmp_path / "other.json",
            gram_records=[grams.with_suffix(".json")],
        )


def test_the_concept_token_mask_finds_the_phrase_or_names_the_prompt(tiny_sd1_dir):
    from transformers import CLIPTokenizer

    from lorachain.modular import ModularError, concept_token_mask

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd1_dir / "tokenizer")
    mask = concept_token_mask(tokenizer, "a photo of sks dog", "sks dog")
    ids = tokenizer("a photo of sks dog").input_ids  # <bos> a photo of sks dog <eos>
    assert mask.shape == (1, tokenizer.model_max_length) and mask[0].nonzero().flatten().tolist() == [4, 5]
    assert ids[4:6] == tokenizer("sks dog", add_special_tokens=False).input_ids
    with pytest.raises(ModularError, match="'zwz cat' is not among the tokens of its prompt 'a photo of sks dog'"):
        concept_token_mask(tokenizer, "a photo of sks dog", "zwz cat")


def _scores(rows):
    return pd.DataFrame(
        rows,
        columns=[
            "model",
            "method",
            "domain",
            "order",
            "seed",
            "after_task",
            "task",
            "concept",
            "metric",
            "score",
            "n_images",
            "n_references",
        ],
    )


def test_modular_table_reports_the_largest_k_and_the_curve(tmp_path):
    from lorachain.report.modular import (
        ModularResultError,
        modular_ablation_job,
        modular_prior_drift_job,
        modular_results_job,
    )

    rows = []
    for k in (1, 2):
        for task in range(1, k + 1):
            for metric, value in (
                ("clip_i", 0.5 + 0.1 * task - 0.05 * k),
                ("clip_t", 0.3),
                ("clip_score", 0.75),
                ("prior_drift_clip", 0.1 * k),
            ):
                rows.append(["m", "blocklora", "objects", 0, 0, k, task, f"c{task}", metric, value, 1, 1])
    _scores(rows).to_csv(tmp_path / "scores.csv", index=False)
    records = {}
    for k in (1, 2):
        path = tmp_path / f"merge{k}.json"
        path.write_text(json.dumps({"k": k, "merge_s": 0.01 * k, "merge_type": "instant"}))
        records[f"m|{k}"] = str(path)
    merges = {
        "m": {"method": "blocklora", "adapters": "b", "adapter_method": "blocklora", "adapter_params": {"erasure": 0}}
    }
    job = dict(
        domain="objects",
        scores={"m": str(tmp_path / "scores.csv")},
        records=records,
        merges=merges,
        merge_order=["m"],
        metrics=["dino", "clip_i", "clip_t", "clip_score", "prior_drift_clip"],
        table=tmp_path / "t.csv",
        markdown=tmp_path / "t.md",
        points=tmp_path / "points.csv",
        curve=tmp_path / "curve.png",
        curve_pdf=tmp_path / "curve.pdf",
        model=str(tmp_path),  # a local "model": its revision is a fingerprint
    )
    row = modular_results_job(**job)[0]
    assert row["k"] == 2 and row["merge_s"] == pytest.approx(0.02) and row["image_metric"] == "clip_i"
    # the CSV closes with the provenance columns: this process's versions and the model's fingerprint
    written = pd.read_csv(tmp_path / "t.csv")
    assert list(written.columns[-len(provenance.COLUMNS) :]) == list(provenance.COLUMNS)
    assert row["peft"] == importlib.metadata.version("peft") and row["model_revision"].startswith("local:")
    assert row["image_alignment"] == pytest.approx((0.5 + 0.1 - 0.1 + 0.5 + 0.2 - 0.1) / 2)
    # both text conventions, each average labelled by what it averages
    assert row["text_alignment"] == pytest.approx(0.3) and row["text_clipscore"] == pytest.approx(0.75)
    assert row["average"] == pytest.approx((row["image_alignment"] + 0.3) / 2)
    assert row["average_clipscore"] == pytest.approx((row["image_alignment"] + 0.75) / 2)
    assert row["prior_drift"] == pytest.approx(0.2) and row["prior_metric"] == "prior_drift_clip"
    markdown = (tmp_path / "t.md").read_text()
    assert (tmp_path / "curve.png").is_file() and "| m | instant | blocklora (b) | 2 |" in markdown
    assert "text alignment (CLIPScore)" in markdown and "the paper's Avg" in markdown
    modular_prior_drift_job(
        domain="objects",
        metric="prior_drift_clip",
        points=tmp_path / "points.csv",
        curve=tmp_path / "d.png",
        curve_pdf=tmp_path / "d.pdf",
    )
    assert (tmp_path / "d.png").is_file() and (tmp_path / "d.pdf").is_file()
    ablation = modular_ablation_job(
        domain="objects", rows=["m"], table=tmp_path / "t.csv", ablation=tmp_path / "a.csv", markdown=tmp_path / "a.md"
    )
    assert ablation[0]["adapter_params"] == "blocklora(erasure=0)" and ablation[0]["prior_drift"] == pytest.approx(0.2)
    assert "| m | blocklora(erasure=0) | 2 |" in (tmp_path / "a.md").read_text()
    with pytest.raises(ModularResultError, match="no rows for the ablation's merges \\['x'\\]"):
        modular_ablation_job(
            domain="objects",
            rows=["x"],
            table=tmp_path / "t.csv",
            ablation=tmp_path / "a.csv",
            markdown=tmp_path / "a.md",
        )
    del records["m|1"]
    with pytest.raises(ModularResultError, match="no merge record for merge 'm' at k = 1"):
        modular_results_job(**{**job, "metrics": ["clip_i", "clip_t"]})


def test_the_modular_prompts_default_to_blocklora_s_twenty_per_concept_and_need_the_placeholder():
    from lorachain.data.selection import BLOCKLORA_STYLE_TEMPLATES, Task
    from lorachain.modular import ModularError, modular_tasks

    thing = Task(
        concept="teapot",
        kind="object",
        token="cws",
        class_name="teapot",
        train_prompt="a photo of cws teapot",
        train_images=("a.png",),
        eval_prompts=("a cws teapot in a jail",),
        reference_images=("a.png",),
    )
    style = Task(
        concept="Ink_Art",
        kind="style",
        token=None,
        class_name="Flowers",
        train_prompt="ink art image of flowers",
        train_images=("a.png",),
        eval_prompts=("ink art image of a clock",),
        reference_images=("a.png",),
    )
    tasks = modular_tasks([thing, style], {})
    assert [len(task.eval_prompts) for task in tasks] == [20, 20]
    assert tasks[0].eval_prompts[0] == "a cws teapot in the jungle" and len(BLOCKLORA_STYLE_TEMPLATES) == 20
    assert tasks[1].eval_prompts[3] == "ink art image of a butterfly"
    assert modular_tasks([thing], {"object": ["a {} on a table"]})[0].eval_prompts == ("a cws teapot on a table",)
    with pytest.raises(
        ModularError, match=r"modular\.eval_prompts\.object: 'a teapot' must hold the concept placeholder"
    ):
        modular_tasks([thing], {"object": ["a teapot"]})
