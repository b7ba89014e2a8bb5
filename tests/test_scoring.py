"""Metric math on hand-made embeddings, and scoring sample sets with the tiny encoders."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from lorachain.data import Task
from lorachain.metrics.scoring import (
    ScoreError,
    base_prior_embeddings,
    clip_score,
    embed_references,
    load_references,
    mean_matched_cosine,
    mean_pairwise_cosine,
    paired_drift,
    read_scores,
    score_sample_sets,
    write_scores,
)
from lorachain.torch_env import torch


def test_mean_pairwise_cosine_by_hand():
    generated = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    references = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    # cosines: row 1: 1, 1/sqrt2, 0; row 2: 0, 1/sqrt2, -1
    expected = (1 + 2 / math.sqrt(2) + 0 + 0 - 1) / 6
    assert mean_pairwise_cosine(generated, references) == pytest.approx(expected)
    assert mean_pairwise_cosine(references, generated) == pytest.approx(expected)  # symmetric
    assert mean_pairwise_cosine(generated * 7, references * 0.1) == pytest.approx(expected)  # scale-free
    with pytest.raises(ScoreError):
        mean_pairwise_cosine(generated, references[:0])


def test_clip_t_is_the_matched_cosine_not_all_pairs():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    assert mean_matched_cosine(images, texts) == pytest.approx((1 + 1 / math.sqrt(2)) / 2)
    with pytest.raises(ScoreError, match="equal"):
        mean_matched_cosine(images, texts[:1])


def test_clip_score_is_hessels_convention_not_the_raw_cosine():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    texts = torch.tensor([[2.0, 0.0], [0.0, -3.0], [1.0, 0.0]])
    # cosines 1, -1, 1/sqrt2: CLIPScore clips the negative one at 0 and scales by 2.5
    assert clip_score(images, texts) == pytest.approx(2.5 * (1 + 0 + 1 / math.sqrt(2)) / 3)
    assert mean_matched_cosine(images, texts) == pytest.approx((1 - 1 + 1 / math.sqrt(2)) / 3)
    with pytest.raises(ScoreError, match="equal"):
        clip_score(images, texts[:2])


def test_the_clipscore_text_and_the_prior_prompt_drop_the_rare_token():
    thing = Task(
        concept="c1",
        kind="object",
        token="sks",
        class_name="sneaker",
        train_images=["a.png"],
        train_prompt="a photo of sks sneaker",
        eval_prompts=["a sks sneaker in a jail"],
        reference_images=["a.png"],
    )
    assert thing.plain_prompt("a sks sneaker in a jail") == "a sneaker in a jail"
    assert thing.prior_prompt == "a photo of sneaker"
    style = Task(
        concept="Palette_Knife",
        kind="style",
        token=None,
        class_name="Architectures",
        train_images=["a.png"],
        train_prompt="palette knife image of architectures",
        eval_prompts=["palette knife image of a clock"],
        reference_images=["a.png"],
    )
    assert style.plain_prompt("palette knife image of a clock") == "palette knife image of a clock"
    assert style.prior_prompt == "image of architectures"


def test_prior_drift_pairs_images_by_noise():
    base = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert paired_drift(base * 3, base) == pytest.approx(0.0, abs=1e-7)
    assert paired_drift(base.flip(0), base) == pytest.approx(1.0)  # the same images, other noises: not paired
    assert paired_drift(torch.tensor([[1.0, 1.0], [0.0, 1.0]]), base) == pytest.approx(1 - (1 / math.sqrt(2) + 1) / 2)
    with pytest.raises(ScoreError, match="pairs images by noise"):
        paired_drift(base, base[:1])


class FakeEncoder:
    """Embeds an image as its mean colour, a text as a fixed vector: exact expected scores."""

    def __init__(self, name):
        self.name = name

    def embed_images(self, images, batch_size=32):
        return torch.tensor(np.stack([np.asarray(image, dtype=np.float32).mean(axis=(0, 1)) + 1.0 for image in images]))

    def embed_texts(self, texts, batch_size=64):
        return torch.tensor([[1.0, 0.0, 0.0] if "red" in text else [0.0, 0.0, 1.0] for text in texts])


def _solid(path, colour):
    from PIL import Image

    Image.new("RGB", (8, 8), colour).save(path)
    return str(path)


@pytest.fixture
def sample_set(tmp_path):
    red, blue = _solid(tmp_path / "red.png", (255, 0, 0)), _solid(tmp_path / "blue.png", (0, 0, 255))
    rows = [
        {
            "path": red,
            "model": "m",
            "method": "naive",
            "domain": "d",
            "order": 0,
            "seed": 0,
            "after_task": 1,
            "task": 1,
            "concept": "c1",
            "role": "concept",
            "prompt_index": 0,
            "prompt": "a red thing",
            "plain_prompt": "a red thing",
            "sample": 0,
            "noise_seed": 42,
        },
        {
            "path": blue,
            "model": "m",
            "method": "naive",
            "domain": "d",
            "order": 0,
            "seed": 0,
            "after_task": 1,
            "task": 1,
            "concept": "c1",
            "role": "concept",
            "prompt_index": 1,
            "prompt": "a blue thing",
            "plain_prompt": "a blue thing",
            "sample": 0,
            "noise_seed": 42,
        },
    ]
    task = Task(
        concept="c1",
        kind="object",
        token="sks",
        class_name="thing",
        train_images=[red],
        train_prompt="a photo of sks thing",
        eval_prompts=["a red thing", "a blue thing"],
        reference_images=[red],
    )
    return pd.DataFrame(rows), task


def test_score_sample_set_with_exact_embeddings(sample_set, tmp_path):
    frame, task = sample_set
    encoders = {"dino": FakeEncoder("dino"), "clip": FakeEncoder("clip")}
    embed_references([task], encoders, ["dino", "clip_i", "clip_t"], tmp_path / "refs.safetensors")
    references = load_references(tmp_path / "refs.safetensors")
    assert set(references) == {"dino/c1", "clip/c1"}
    rows = score_sample_sets([frame], references, encoders, ["dino", "clip_i", "clip_t"], ["index.csv"])
    scores = {row["metric"]: row for row in rows}
    red, blue = np.array([256.0, 1, 1]), np.array([1.0, 1, 256])
    cos = float(red @ blue / (np.linalg.norm(red) * np.linalg.norm(blue)))
    assert scores["dino"]["score"] == pytest.approx((1 + cos) / 2, rel=1e-5)
    assert scores["clip_i"]["n_references"] == 1 and scores["clip_i"]["n_images"] == 2
    # CLIP-T: each image with its own prompt, both aligned here
    text_cos_red = red[0] / np.linalg.norm(red)
    text_cos_blue = blue[2] / np.linalg.norm(blue)
    assert scores["clip_t"]["score"] == pytest.approx((text_cos_red + text_cos_blue) / 2, rel=1e-5)
    write_scores(rows, tmp_path / "scores.csv")
    assert len(read_scores(tmp_path / "scores.csv")) == 3


def test_bad_scoring_input_names_the_file(sample_set, tmp_path):
    frame, task = sample_set
    encoders = {"dino": FakeEncoder("dino")}
    with pytest.raises(ScoreError, match="sets/index.csv: no reference embeddings 'dino/c1'"):
        score_sample_sets([frame], {}, encoders, ["dino"], ["sets/index.csv"])
    nan_encoder = FakeEncoder("dino")
    nan_encoder.embed_images = lambda images, batch_size=32: torch.full((len(images), 3), math.nan)
    with pytest.raises(ScoreError, match="sets/index.csv: dino on task 1 after task 1 is nan"):
        score_sample_sets([frame], {"dino/c1": torch.ones(1, 3)}, {"dino": nan_encoder}, ["dino"], ["sets/index.csv"])
    empty = Task(**{**task.to_dict(), "reference_images": []})
    with pytest.raises(ScoreError, match="task c1: no reference images"):
        embed_references([empty], encoders, ["dino"], tmp_path / "refs.safetensors")
    broken = Task(**{**task.to_dict(), "reference_images": [str(tmp_path / "missing.jpg")]})
    with pytest.raises(ScoreError, match="missing.jpg: cannot read image"):
        embed_references([broken], encoders, ["dino"], tmp_path / "refs.safetensors")
    with pytest.raises(ScoreError, match="references.safetensors: reference embeddings missing"):
        load_references(tmp_path / "references.safetensors")
    write_scores(
        [
            {
                "model": "m",
                "method": "m",
                "domain": "d",
                "order": 0,
                "seed": 0,
                "after_task": 1,
                "task": 1,
                "concept": "c",
                "metric": "dino",
                "score": math.nan,
                "n_images": 1,
                "n_references": 1,
            }
        ],
        tmp_path / "nan.csv",
    )
    with pytest.raises(ScoreError, match="nan.csv: dino on task 1 after task 1 is nan"):
        read_scores(tmp_path / "nan.csv")


def test_tiny_encoders_score_a_sample_set_end_to_end(sample_set, tmp_path):
    from lorachain.metrics.encoders import save_tiny_encoder
    from lorachain.metrics.scoring import load_encoders

    frame, task = sample_set
    blocks = {
        "dino": {"pretrained": str(save_tiny_encoder("dino", tmp_path / "dino"))},
        "clip": {"pretrained": str(save_tiny_encoder("clip", tmp_path / "clip"))},
        "csd": {"checkpoint": str(save_tiny_encoder("csd", tmp_path / "csd"))},
    }
    metrics = ["dino", "clip_i", "clip_t", "csd"]
    encoders, load_s = load_encoders(metrics, blocks, device="cpu")
    assert sorted(encoders) == ["clip", "csd", "dino"] and load_s > 0
    embed_references([task], encoders, metrics, tmp_path / "refs.safetensors")
    rows = score_sample_sets([frame], load_references(tmp_path / "refs.safetensors"), encoders, metrics, ["index.csv"])
    assert [row["metric"] for row in rows] == metrics
    assert all(-1.0 <= row["score"] <= 1.0 for row in rows)


def _with_prior(frame, tmp_path, colour, name):
    prior = {**frame.iloc[0].to_dict(), "role": "prior", "prompt_index": -1, "prompt": "a photo of thing"}
    prior.update(plain_prompt="a photo of thing", path=_solid(tmp_path / f"{name}.png", colour))
    return pd.concat([frame, pd.DataFrame([prior])], ignore_index=True)


def test_clip_score_and_prior_drift_rows_of_a_sample_set(sample_set, tmp_path):
    frame, task = sample_set
    encoders = {"dino": FakeEncoder("dino"), "clip": FakeEncoder("clip")}
    embed_references([task], encoders, ["clip_i"], tmp_path / "refs.safetensors")
    references = load_references(tmp_path / "refs.safetensors")
    model = _with_prior(frame, tmp_path, (255, 0, 0), "model-prior")
    base = _with_prior(frame, tmp_path, (0, 0, 255), "base-prior")
    metrics = ["clip_i", "clip_t", "clip_score", "prior_drift_clip"]
    priors = base_prior_embeddings(base, encoders, metrics)
    rows = score_sample_sets([model], references, encoders, metrics, ["index.csv"], base_priors=priors)
    scores = {row["metric"]: row for row in rows}
    assert [row["metric"] for row in rows] == metrics
    red, blue = np.array([256.0, 1, 1]), np.array([1.0, 1, 256])
    # "A photo depicts a red thing" embeds as the red text vector: CLIPScore = 2.5 x the raw cosine here
    assert scores["clip_score"]["score"] == pytest.approx(2.5 * scores["clip_t"]["score"], rel=1e-6)
    cos = float(red @ blue / (np.linalg.norm(red) * np.linalg.norm(blue)))
    assert scores["prior_drift_clip"]["score"] == pytest.approx(1 - cos, rel=1e-5)
    assert scores["prior_drift_clip"]["n_images"] == 1
    # the class-prompt image is not a concept image: CLIP-I is still over the two concept images
    assert scores["clip_i"]["n_images"] == 2
    own = score_sample_sets([base], references, encoders, ["prior_drift_clip"], ["index.csv"], base_priors=priors)
    assert own[0]["score"] == pytest.approx(0.0, abs=1e-6)  # the base model against itself
    with pytest.raises(ScoreError, match="sampling.prior_samples: true"):
        score_sample_sets([frame], references, encoders, ["prior_drift_clip"], ["index.csv"], base_priors=priors)
    with pytest.raises(ScoreError, match="needs the base model's class-prompt images"):
        score_sample_sets([model], references, encoders, ["prior_drift_clip"], ["index.csv"])
