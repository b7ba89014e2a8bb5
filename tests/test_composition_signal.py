"""Signal of composition on the miniature world: a subject and a style trained independently as
BlockLoRA adapters, alone and merged (alpha_i = 1), sampled on a composed prompt in the world's
caption form ("byzantine image of a sks cross") with the base model's noises, each member scored
against its own references (the subject by DINO and CLIP-I, the style by CSD).

What holds (docs/world.md#composition): each concept alone raises its own axis over the base model
(the subject's LoRA the subject's CLIP-I, the style's LoRA the style's CSD), and the merge draws the
subject (CLIP-I far above the base model's); a composition that filled a placeholder with the wrong
concept, or a scorer that read the wrong references, fails these. What the issue expected and the
world does not show: the merge above the base model on *both* axes. The merged model loses the
style that the style's LoRA alone draws (CSD below the base model's), and the subject's DINO stays
at the base model's level even for the subject's own LoRA: the world's base model never saw a
named instance in a style. Known and reported, not hidden: those cases are xfail and may pass.
"""

from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
MARGIN = 0.02  # cosine: the least effect accepted (tests/test_signal.py's)

TEMPLATE = "{style} image of a {subject}"


@pytest.fixture(scope="module")
def stylized(pretrained_world, tmp_path_factory):
    """Scores of the base model and of the BlockLoRA merge of object 1 and style 1 on the demo's
    stylization prompt."""
    import pandas as pd

    from lorachain.composition import member_summary, read_composition_index
    from lorachain.data.domains import select_domain_tasks
    from lorachain.methods import make_merge
    from lorachain.metrics.scoring import embed_references, load_encoders, load_references, score_compositions
    from lorachain.modular import load_concept
    from lorachain.sample import SamplingConfig, load_model_for_sampling, sample_compositions
    from lorachain.state import FoldedState, apply_to_unet
    from lorachain.train import train_task
    from lorachain.training.config import derived_seed
    from lorachain.world.jobs import world_data_job

    root = tmp_path_factory.mktemp("stylized")
    world_data_job(world=DEMO["world"], objects=root / "objects", styles=root / "styles")
    subject = select_domain_tasks("dreambooth", root / "objects", {"num_tasks": 1}, domain="objects")[0]
    style = select_domain_tasks(
        "unlearncanvas", root / "styles", {"num_tasks": 1, "train_images_per_style": 4}, domain="styles"
    )[0]
    tasks = [subject, style]
    metrics = {"1": ["dino", "clip_i"], "2": ["csd"]}
    blocks = {name: {"pretrained": str(pretrained_world / name)} for name in ("dino", "clip")}
    blocks["csd"] = {"checkpoint": str(pretrained_world / "csd" / "checkpoint.pth")}
    encoders, _ = load_encoders(["dino", "clip_i", "csd"], blocks, device="cpu")
    embed_references(tasks, encoders, metrics, root / "references.safetensors")
    references = load_references(root / "references.safetensors")
    adapter = {k: v for k, v in DEMO["modular"]["adapters"]["blocklora"].items() if k != "method"}
    states = []
    for slot, task in enumerate(tasks):
        output = root / "states" / task.concept
        train_task(
            model_source=str(pretrained_world / "pipeline"),
            train_images=list(task.train_images),
            train_prompt=task.train_prompt,
            task_index=1,
            previous_state=None,
            method_name="blocklora",
            method_params=adapter,
            training=DEMO["training"],
            seed=derived_seed(0, slot + 1),
            output_dir=output,
            run={"method": "blocklora", "seed": 0},
            concept=task.concept,
            progress=False,
            slot=slot,
        )
        states.append(output)
    merged = make_merge("blocklora", {}).merge([load_concept(state)[0] for state in states])
    compositions = {"stylized": {"set": "mixed", "prompts": [TEMPLATE], "groups": {"subject": [1], "style": [2]}}}
    config = SamplingConfig.from_dict(DEMO["sampling"])
    result = {}
    for name, state in (("base", None), ("subject", states[0]), ("style", states[1]), ("merge", None)):
        pipe = load_model_for_sampling(str(pretrained_world / "pipeline"), None, state, "blocklora", adapter)
        if name == "merge":
            apply_to_unet(pipe.unet, FoldedState(tasks_done=2, merged=merged))
        identity = {"model": name, "method": name, "domain": "mixed", "order": 0, "seed": 0, "after_task": 2}
        sample_compositions(pipe, compositions, tasks, 2, config, root / "compositions" / name, identity)
        frame = read_composition_index(root / "compositions" / name)
        rows = score_compositions([frame], references, encoders, metrics, [name])
        summary = member_summary(pd.DataFrame(rows))
        result[name] = {(s, m): v for s, m, v in zip(summary["statistic"], summary["metric"], summary["score"])}
        print(name, {f"{s} {m}": round(v, 3) for (s, m), v in sorted(result[name].items())})  # pytest -s
    return result


def gain(stylized, model: str, axis: tuple[str, str]) -> float:
    return stylized[model][axis] - stylized["base"][axis]


def test_each_concept_alone_raises_its_own_axis_on_the_composed_prompt(stylized):
    assert gain(stylized, "subject", ("subject", "clip_i")) > MARGIN, stylized
    assert gain(stylized, "style", ("style", "csd")) > MARGIN, stylized


def test_the_merge_draws_the_subject_in_the_composed_prompt(stylized):
    assert gain(stylized, "merge", ("subject", "clip_i")) > MARGIN, stylized


WORLD_STYLIZATION = (
    "the world: the merge loses the style's CSD and the subject's DINO stays at the base (docs/world.md)"
)


@pytest.mark.parametrize(
    "axis",
    [
        pytest.param(("subject", "dino"), marks=pytest.mark.xfail(reason=WORLD_STYLIZATION)),
        ("subject", "clip_i"),
        pytest.param(("style", "csd"), marks=pytest.mark.xfail(reason=WORLD_STYLIZATION)),
    ],
)
def test_a_blocklora_merge_of_a_subject_and_a_style_beats_the_base_model_on_both_axes(stylized, axis):
    assert gain(stylized, "merge", axis) > MARGIN, f"{axis}: the merge scores {gain(stylized, 'merge', axis):+.3f}"
