"""Composing concepts: the config block, the composed prompts, per-member scoring (minimum and mean
over the members, on hand-made embeddings) and the tables built from it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from lorachain.composition import CompositionError, composed_prompts, member_summary, parse_composition
from lorachain.config_checks import composition_problems
from lorachain.data.selection import Task
from lorachain.metrics.scoring import score_compositions

ROOT = Path(__file__).resolve().parents[1]


def task(concept, kind="object", token="sks", class_name="star"):
    return Task(
        concept=concept,
        kind=kind,
        token=token if kind == "object" else None,
        class_name=class_name,
        train_images=(),
        train_prompt="",
        eval_prompts=(),
        reference_images=(),
    )


# ------------------------------------------------------------------------------ the config block


def test_groups_as_a_product_and_prompts_filled_with_each_members_phrase():
    composition = parse_composition(
        "stylized",
        {"set": "mixed", "prompts": ["a {subject} in {style} style"], "groups": {"subject": [1, 2], "style": [3]}},
    )
    assert composition.placeholders == ("subject", "style")
    assert composition.groups == ((1, 3), (2, 3))
    tasks = [task("dog1", token="sks", class_name="dog"), task("cat", token="zwz", class_name="cat"),
             task("Byzantine", kind="style", class_name="Butterfly")]  # fmt: skip
    prompts = composed_prompts([composition], tasks, k=3)
    assert [(p.prompt, p.plain_prompt, p.concepts) for p in prompts] == [
        ("a sks dog in byzantine style", "a dog in byzantine style", ("dog1", "Byzantine")),
        ("a zwz cat in byzantine style", "a cat in byzantine style", ("cat", "Byzantine")),
    ]
    assert composed_prompts([composition], tasks, k=2) == []  # the style is not among the first 2


@pytest.mark.parametrize(
    "block, message",
    [
        ({"prompts": ["a {a} and a {b}", "a {a} on a beach"]}, "missing ['b']"),
        ({"prompts": ["a {a} and a {b}", "a {a} and a {b} and a {c}"]}, "extra ['c']"),
        ({"prompts": ["a {a} alone"]}, "two or more placeholders"),
        ({"groups": [[1, 2, 3]]}, "3 positions for 2 placeholders"),
        ({"groups": [[1, 1]]}, "names one concept twice"),
        ({"groups": {"a": [1], "c": [2]}}, "names ['a', 'c']"),
    ],
)
def test_a_bad_block_is_refused_naming_the_key(block, message):
    full = {"set": "objects", "prompts": ["a {a} and a {b}"], "groups": [[1, 2]], **block}
    with pytest.raises(CompositionError, match=r"compositions\.pair\.") as error:
        parse_composition("pair", full)
    assert message in str(error.value)


def demo_config() -> dict:
    return yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())


def test_the_demo_and_paper_compositions_pass_the_check():
    assert composition_problems(demo_config()) == []
    assert composition_problems(yaml.safe_load((ROOT / "config" / "config.yaml").read_text())) == []


def test_a_concept_a_regime_does_not_train_fails_the_check_naming_the_key():
    config = demo_config()
    config["compositions"]["together"]["groups"] = [[1, 4]]  # 3 continual tasks and 3 modular concepts
    config["compositions"]["stylized"]["set"] = "nowhere"
    problems = composition_problems(config)
    assert problems[0].startswith("config key compositions.stylized.set: 'nowhere' is neither a domain nor")
    assert problems[1].startswith("config key compositions.together.groups: [1, 4] names a concept outside 1..3")


# ------------------------------------------------------------------------------ scoring


class ColourEncoder:
    """A hand-made embedding: an image's mean colour (so red and green are orthogonal)."""

    def embed_images(self, images, batch_size=32):
        import numpy as np

        from lorachain.torch_env import torch

        return torch.tensor(np.stack([np.asarray(image, dtype=np.float32).mean(axis=(0, 1)) for image in images]))


def write_image(path: Path, colour) -> str:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), colour).save(path)
    return str(path)


def test_each_subject_is_scored_against_its_own_references_with_the_defined_min_and_mean(tmp_path):
    """Two subjects (red, green references); prompt 0 shows red twice, prompt 1 red and yellow: per
    prompt, each subject's mean pairwise cosine, then the minimum and mean over the two."""
    import pandas as pd

    from lorachain.torch_env import torch

    red, yellow = (255, 0, 0), (255, 255, 0)
    images = {(0, 0): red, (0, 1): red, (1, 0): red, (1, 1): yellow}
    rows = [
        {
            "path": write_image(tmp_path / f"p{p}-n{n}.png", colour),
            "model": "m",
            "method": "m",
            "domain": "objects",
            "order": 0,
            "seed": 0,
            "after_task": 2,
            "composition": "pair",
            "group": "1+2",
            "placeholders": "a+b",
            "positions": "1+2",
            "concepts": "redthing+greenthing",
            "prompt_index": p,
            "prompt": "x",
            "plain_prompt": "x",
            "sample": n,
            "noise_seed": 0,
        }  # fmt: skip
        for (p, n), colour in images.items()
    ]
    references = {"dino/redthing": torch.tensor([[1.0, 0, 0]]), "dino/greenthing": torch.tensor([[0, 1.0, 0]])}
    scores = pd.DataFrame(
        score_compositions([pd.DataFrame(rows)], references, {"dino": ColourEncoder()}, ["dino"], ["t"])
    )
    by = {(r.prompt_index, r.member): r.score for r in scores.itertuples()}
    diagonal = 1 / math.sqrt(2)
    assert by[(0, "a")] == pytest.approx(1.0) and by[(0, "b")] == pytest.approx(0.0)
    assert by[(1, "a")] == pytest.approx((1 + diagonal) / 2) and by[(1, "b")] == pytest.approx(diagonal / 2)
    summary = member_summary(scores).set_index(["prompt_index", "statistic"])["score"]
    assert summary[(0, "min")] == pytest.approx(0.0) and summary[(0, "mean")] == pytest.approx(0.5)
    assert summary[(1, "min")] == pytest.approx(diagonal / 2)
    assert summary[(1, "mean")] == pytest.approx((1 + 2 * diagonal) / 4)
    assert summary[(1, "a")] == pytest.approx((1 + diagonal) / 2)


def test_a_style_member_is_scored_by_its_own_domains_metrics(tmp_path):
    """A mixed set scores the subject (position 1) by DINO and the style (position 2) by CSD."""
    import pandas as pd

    from lorachain.torch_env import torch

    row = {"path": write_image(tmp_path / "a.png", (255, 0, 0)), "model": "m", "method": "m", "domain": "mixed",
           "order": 0, "seed": 0, "after_task": 2, "composition": "s", "group": "1+2", "placeholders": "subject+style",
           "positions": "1+2", "concepts": "dog+Byzantine", "prompt_index": 0, "prompt": "x", "plain_prompt": "x",
           "sample": 0, "noise_seed": 0}  # fmt: skip
    references = {"dino/dog": torch.tensor([[1.0, 0, 0]]), "csd/Byzantine": torch.tensor([[0, 1.0, 0]])}
    encoders = {"dino": ColourEncoder(), "csd": ColourEncoder()}
    rows = score_compositions([pd.DataFrame([row])], references, encoders, {"1": ["dino"], "2": ["csd"]}, ["t"])
    assert [(r["member"], r["metric"], round(r["score"], 6)) for r in rows] == [
        ("subject", "dino", 1.0),
        ("style", "csd", 0.0),
    ]


def test_the_continual_composition_rows_are_P_at_learning_S_at_the_end_and_their_difference():
    """Group 1+2 completes after task 2 and group 2+3 after task 3 (T = 3)."""
    import pandas as pd

    from lorachain.report.composition import _run_values

    rows = []
    for group, after, score in [("1+2", 2, 0.6), ("1+2", 3, 0.4), ("2+3", 3, 0.5)]:
        for member, value in (("a", score), ("b", score + 0.2)):
            rows.append({"model": "naive", "method": "naive", "domain": "objects", "order": 0, "seed": 0,
                         "after_task": after, "composition": "pair", "group": group, "prompt_index": 0,
                         "member": member, "position": 0, "concept": "", "metric": "dino", "score": value,
                         "n_images": 1})  # fmt: skip
    values = _run_values(member_summary(pd.DataFrame(rows)), num_tasks=3)
    assert values["pair: min dino"] == pytest.approx({"P": 0.55, "S": 0.45, "F": 0.10})
    assert values["pair: mean dino"] == pytest.approx({"P": 0.65, "S": 0.55, "F": 0.10})
    assert set(values) == {"pair: min dino", "pair: mean dino"}


def test_the_modular_table_holds_every_group_at_the_largest_k_and_the_curve_follows_the_same_groups(tmp_path):
    """Group 1+2 exists from k = 2, group 2+3 only at k = 3: the table's k = 3 row averages both,
    the by-k points follow 1+2 alone (so the curve against k is not a change of groups)."""
    import pandas as pd

    from lorachain.composition import SCORE_COLUMNS
    from lorachain.report.composition import modular_composition_table

    def write(path, model, entries):
        rows = [
            {
                "model": model,
                "method": model,
                "domain": "objects",
                "order": 0,
                "seed": 0,
                "after_task": k,
                "composition": "pair",
                "group": group,
                "prompt_index": 0,
                "member": member,
                "position": 0,
                "concept": "",
                "metric": "dino",
                "score": score,
                "n_images": 1,
            }  # fmt: skip
            for k, group, scores in entries
            for member, score in zip("ab", scores)
        ]
        pd.DataFrame(rows, columns=list(SCORE_COLUMNS)).to_csv(path, index=False)
        return str(path)

    base = write(tmp_path / "base.csv", "base", [(0, "1+2", (0.0, 0.0)), (0, "2+3", (0.1, 0.1))])
    merge = write(tmp_path / "m.csv", "m", [(2, "1+2", (0.5, 0.3)), (3, "1+2", (0.4, 0.2)), (3, "2+3", (0.8, 0.6))])
    table, points = modular_composition_table({"m": merge}, base, "pair", ["m"])
    row = table.set_index("merge").loc["m"]
    assert row["k"] == 3 and row["min dino"] == pytest.approx((0.2 + 0.6) / 2)
    assert table.set_index("merge").loc["base", "min dino"] == pytest.approx(0.05)
    curve = points[points["column"] == "min dino"].set_index(["merge", "k"])["score"]
    assert curve[("m", 2)] == pytest.approx(0.3) and curve[("m", 3)] == pytest.approx(0.2)
    assert curve[("base", 0)] == pytest.approx(0.0)
