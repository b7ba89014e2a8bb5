"""Signal: on the pretrained miniature world, with the demo's training and sampling settings,
training learns, a naive chain forgets, and a BlockLoRA merge of two concepts lowers their scores
less than weighted averaging does.

Each assertion compares scores of models that really learned something (docs/world.md), through
the library's own train -> fold -> apply -> sample -> score path, so each fails when one of those
is wrong: a fold or an apply that drops the LoRA leaves every state at the base model's score, one
that drops the second task leaves task 1 where it was, and a weighted average that sums instead
of averaging fails the merge test (checked on an earlier build: task 2's score then rises by
0.115, BlockLoRA's by 0.055).

What the world shows here (docs/world.md#signal): a concept's score rises from training on it, but
on the first concept also from training on the second, so the merge test compares how much each
concept's score falls when merged (a rise is a negative fall), not how close it stays.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
METRICS = ["dino", "clip_i"]
MARGIN = 0.02  # cosine: the least effect each assertion below accepts


@pytest.fixture(scope="module")
def lab(pretrained_world, tmp_path_factory):
    """The demo's world, two of its object concepts, the world's DINO and CLIP, and the base
    model's scores on the concepts."""
    from lorachain.data.domains import select_domain_tasks
    from lorachain.metrics.scoring import embed_references, load_encoders, load_references
    from lorachain.world.jobs import world_data_job

    root = tmp_path_factory.mktemp("signal")
    world_data_job(world=DEMO["world"], objects=root / "objects", styles=root / "styles")
    block = {"num_tasks": 2, "eval_prompts": DEMO["domains"]["objects"]["eval_prompts"]}
    tasks = select_domain_tasks("dreambooth", root / "objects", block, domain="objects")
    blocks = {name: {"pretrained": str(pretrained_world / name)} for name in ("dino", "clip")}
    encoders, _ = load_encoders(METRICS, blocks, device="cpu")
    embed_references(tasks, encoders, METRICS, root / "references.safetensors")
    lab = {
        "root": root,
        "model": str(pretrained_world / "pipeline"),
        "tasks": tasks,
        "encoders": encoders,
        "references": load_references(root / "references.safetensors"),
    }
    lab["base"] = scores(lab, "base", sampled(lab, "base"))
    return lab


def sampled(lab, name, state_dir=None, method=None, merged=None, params=None):
    """The demo's sample set of both concepts from the base model with a state or a merge applied."""
    from lorachain.sample import SamplingConfig, load_model_for_sampling, sample_tasks
    from lorachain.state import FoldedState, apply_to_unet

    pipe = load_model_for_sampling(lab["model"], None, state_dir, method, params or {})
    if merged is not None:
        apply_to_unet(pipe.unet, FoldedState(tasks_done=2, merged=merged))
    identity = {"model": "world", "method": name, "domain": "objects", "order": 0, "seed": 0, "after_task": 0}
    output = lab["root"] / "samples" / name
    sample_tasks(
        pipe, list(enumerate(lab["tasks"], start=1)), SamplingConfig.from_dict(DEMO["sampling"]), output, identity
    )
    return output


def scores(lab, name, samples) -> dict[tuple[int, str], float]:
    """{(task, metric): mean score} of a sample set, by the library's scoring."""
    from lorachain.metrics.scoring import score_sample_sets
    from lorachain.sample import read_index

    rows = score_sample_sets([read_index(samples)], lab["references"], lab["encoders"], METRICS, [name])
    result = {(row["task"], row["metric"]): row["score"] for row in rows}
    print(name, " ".join(f"task {t} {m} {v:+.3f}" for (t, m), v in sorted(result.items())))  # pytest -s: the figures
    return result


def trained(lab, name, task_index, method, params=None, previous=None, slot=None):
    """Concept `task_index` trained with the demo's training block, on top of `previous` or the base."""
    from lorachain.train import train_task
    from lorachain.training.config import derived_seed

    task = lab["tasks"][task_index - 1]
    output = lab["root"] / "states" / name
    train_task(
        model_source=lab["model"],
        train_images=list(task.train_images),
        train_prompt=task.train_prompt,
        task_index=1 if previous is None else 2,
        previous_state=previous,
        method_name=method,
        method_params=params or {},
        training=DEMO["training"],
        seed=derived_seed(0, task_index),
        output_dir=output,
        run={"method": name.rsplit("-", 1)[0], "seed": 0},  # one run per chain
        concept=task.concept,
        progress=False,
        slot=slot,
    )
    return output


@pytest.fixture(scope="module")
def naive_chain(lab):
    first = trained(lab, "naive-1", 1, "naive")
    second = trained(lab, "naive-2", 2, "naive", previous=str(first))
    return {
        "after_1": scores(lab, "after_1", sampled(lab, "after_1", first, "naive")),
        "after_2": scores(lab, "after_2", sampled(lab, "after_2", second, "naive")),
        "states": (first, second),
    }


def test_a_trained_concept_scores_above_the_base_model(lab, naive_chain):
    for metric in METRICS:
        gain = naive_chain["after_1"][1, metric] - lab["base"][1, metric]
        assert gain > MARGIN, f"{metric}: task 1 gained {gain:+.3f} over the base model by training"


# CLIP-I on the world reads "a world concept" more than "this concept": on the seeded world the
# second concept's LoRA raises the first concept's CLIP-I above its own LoRA's (0.262 against
# 0.245), so naive task 2 *raises* task 1 by CLIP-I (+0.018) while DINO, the identity metric,
# sees it fall (-0.062). Known and reported (docs/world.md#signal), not hidden: it may pass.
@pytest.mark.parametrize(
    "metric",
    ["dino", pytest.param("clip_i", marks=pytest.mark.xfail(reason="world CLIP-I is not identity-specific"))],
)
def test_a_naive_chain_of_two_tasks_lowers_task_ones_score(lab, naive_chain, metric):
    drop = naive_chain["after_1"][1, metric] - naive_chain["after_2"][1, metric]
    assert drop > MARGIN, f"{metric}: task 1 fell by {drop:+.3f} after naive task 2"


def test_a_blocklora_merge_lowers_its_concepts_scores_less_than_weighted_averaging(lab, naive_chain):
    from lorachain.methods import make_merge
    from lorachain.modular import load_concept

    adapter = {k: v for k, v in DEMO["modular"]["adapters"]["blocklora"].items() if k != "method"}
    alpha_1 = {k: v for k, v in DEMO["modular"]["merges"]["blocklora"].items() if k not in ("method", "adapters")}
    second = trained(lab, "lora-2", 2, "naive")
    lora = [naive_chain["states"][0], second]  # concept 1's LoRA is the naive chain's first task
    blocks = [trained(lab, f"blocklora-{i}", i, "blocklora", adapter, slot=i - 1) for i in (1, 2)]
    alone = {
        "weighted_average": [naive_chain["after_1"], scores(lab, "lora-2", sampled(lab, "lora-2", second, "naive"))],
        "blocklora": [
            scores(lab, f"blocklora-{i}", sampled(lab, f"blocklora-{i}", d, "blocklora", params=adapter))
            for i, d in enumerate(blocks, 1)
        ],
    }
    merges = {"weighted_average": ({}, lora), "blocklora": (alpha_1, blocks)}
    drop = {}  # per concept: its single-concept score minus its score in the merge, mean over the metrics
    for name, (params, dirs) in merges.items():
        merged = make_merge(name, params).merge([load_concept(d)[0] for d in dirs])
        together = scores(lab, f"merged-{name}", sampled(lab, f"merged-{name}", merged=merged))
        drop[name] = [
            sum(alone[name][task - 1][task, metric] - together[task, metric] for metric in METRICS) / len(METRICS)
            for task in (1, 2)
        ]
    for task, (blocklora, averaged) in enumerate(zip(drop["blocklora"], drop["weighted_average"]), start=1):
        assert averaged - blocklora > MARGIN, (
            f"task {task}: merged, its score fell by {blocklora:+.3f} under BlockLoRA, "
            f"{averaged:+.3f} under weighted averaging"
        )


def test_prior_drift_is_zero_for_the_base_model_and_positive_for_a_trained_concept(lab, naive_chain):
    """BlockLoRA's Figure 3 measured: the class prompt without the concept ("a photo of <class>"),
    sampled from the same noises, is the base model's own image under the base model (drift 0) and
    moves once a concept of that class is trained (language drift: drift > 0)."""
    from lorachain.metrics.scoring import base_prior_embeddings, score_sample_sets
    from lorachain.sample import read_index

    metrics = ["prior_drift_dino", "prior_drift_clip"]
    base = read_index(lab["root"] / "samples" / "base")
    priors = base_prior_embeddings(base, lab["encoders"], metrics)

    def drift(name: str) -> dict[tuple[int, str], float]:
        index = read_index(lab["root"] / "samples" / name)
        rows = score_sample_sets([index], lab["references"], lab["encoders"], metrics, [name], base_priors=priors)
        return {(row["task"], row["metric"]): row["score"] for row in rows}

    unchanged, trained_1 = drift("base"), drift("after_1")
    print("prior drift", unchanged, trained_1)  # pytest -s: the figures
    assert all(value == pytest.approx(0.0, abs=1e-6) for value in unchanged.values()), unchanged
    for metric in metrics:
        assert trained_1[1, metric] > 1e-4, f"{metric}: task 1's class prompt did not move after training it"
