"""The scoring encoders (DINO, CLIP, CSD): tiny random-weight versions saved and loaded offline."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lorachain.metrics.encoders import (
    METRIC_ENCODER,
    ClipEncoder,
    CsdEncoder,
    DinoEncoder,
    EncoderError,
    load_encoder,
    save_tiny_encoder,
)
from lorachain.torch_env import torch  # noqa: I001  (before anything that imports torchvision)

FIELD = {"dino": "pretrained", "clip": "pretrained", "csd": "checkpoint"}
CLASS = {"dino": DinoEncoder, "clip": ClipEncoder, "csd": CsdEncoder}
TINY_DIM = {"dino": 32, "clip": 32, "csd": 32}


def _images() -> list[Image.Image]:
    """Square, non-square (both orientations), tiny, large and grayscale/RGBA inputs."""
    rng = np.random.default_rng(0)
    rgb = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(64, 64), (100, 40), (37, 300), (512, 384)]]
    return [Image.fromarray(a) for a in rgb] + [
        Image.fromarray(rng.integers(0, 256, (90, 120), dtype=np.uint8)),  # mode "L"
        Image.fromarray(rng.integers(0, 256, (50, 50, 4), dtype=np.uint8), mode="RGBA"),
    ]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("encoders")
    return {name: str(save_tiny_encoder(name, root / name, seed=0)) for name in CLASS}


def _load(name: str, source: str):
    return load_encoder(name, {FIELD[name]: source})


def test_metric_encoder_map():
    assert METRIC_ENCODER == {
        "dino": "dino",
        "clip_i": "clip",
        "clip_t": "clip",
        "clip_score": "clip",
        "csd": "csd",
        "prior_drift_dino": "dino",
        "prior_drift_clip": "clip",
        "prior_drift_csd": "csd",
    }


@pytest.mark.parametrize("name", ["dino", "clip", "csd"])
def test_tiny_encoder_embeds_images(tiny, name):
    encoder = _load(name, tiny[name])
    assert isinstance(encoder, CLASS[name]) and encoder.name == name and encoder.source == tiny[name]
    assert not encoder.model.training
    assert all(p.dtype == torch.float32 for p in encoder.model.parameters())
    images = _images()
    batched = encoder.embed_images(images, batch_size=4)
    assert batched.shape == (len(images), TINY_DIM[name]) and batched.dtype == torch.float32
    assert batched.device.type == "cpu" and not batched.requires_grad
    assert torch.isfinite(batched).all()
    torch.testing.assert_close(batched.norm(dim=1), torch.ones(len(images)), atol=1e-5, rtol=0)
    # Batching must not change an image's embedding.
    torch.testing.assert_close(encoder.embed_images(images, batch_size=1), batched, atol=1e-5, rtol=0)
    # Random weights still separate different images.
    assert (batched[0] - batched[1]).abs().max() > 1e-4
    assert encoder.embed_images([]).shape == (0, TINY_DIM[name])


@pytest.mark.parametrize("name", ["dino", "clip", "csd"])
def test_loading_and_saving_are_deterministic(tiny, name, tmp_path):
    images = _images()[:3]
    first = _load(name, tiny[name]).embed_images(images)
    assert torch.equal(first, _load(name, tiny[name]).embed_images(images))
    # Saving again with the same seed writes the same weights; another seed does not.
    again = _load(name, str(save_tiny_encoder(name, tmp_path / "same", seed=0))).embed_images(images)
    assert torch.equal(first, again)
    other = _load(name, str(save_tiny_encoder(name, tmp_path / "other", seed=1))).embed_images(images)
    assert not torch.allclose(first, other)


def test_saving_keeps_the_callers_rng(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    save_tiny_encoder("csd", tmp_path)
    assert torch.equal(torch.rand(3), expected)


def test_image_encoders_reject_texts(tiny):
    for name in ("dino", "csd"):
        with pytest.raises(EncoderError, match="images only"):
            _load(name, tiny[name]).embed_texts(["a photo"])


def test_clip_texts(tiny):
    from lorachain.models.tokenizer import build_clip_tokenizer

    encoder = _load("clip", tiny["clip"])
    prompts = ["a photo of sks dog", "a dog", "a very long prompt " * 40]  # the last one is truncated to 77 tokens
    texts = encoder.embed_texts(prompts, batch_size=2)
    assert texts.shape == (3, 32) and torch.isfinite(texts).all()
    torch.testing.assert_close(texts.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(encoder.embed_texts(prompts, batch_size=64), texts, atol=1e-5, rtol=0)
    assert (texts[0] - texts[1]).abs().max() > 1e-4
    # The saved processor's tokenizer is the real CLIP BPE.
    prompt = "a photo of sks backpack on a wooden table"
    assert encoder.processor.tokenizer(prompt).input_ids == build_clip_tokenizer()(prompt).input_ids
    assert encoder.processor.tokenizer(prompt).input_ids[0] == 49406


def test_dino_preprocessing(tiny):
    encoder = _load("dino", tiny["dino"])
    small = Image.new("RGB", (64, 64), (200, 10, 10))
    resize = encoder.transform.transforms[0]
    assert resize(small).size == (256, 256)  # short side to 256 first, as in DINO's protocol
    assert resize(Image.new("RGB", (128, 64))).size == (512, 256)
    out = encoder.transform(small)
    assert out.shape == (3, 224, 224)
    # ImageNet normalisation of the red channel: (200/255 - 0.485) / 0.229.
    assert out[0].mean().item() == pytest.approx((200 / 255 - 0.485) / 0.229, abs=1e-2)


def test_csd_preprocessing(tiny):
    encoder = _load("csd", tiny["csd"])
    out = encoder.transform(Image.new("RGB", (300, 100), (0, 0, 0)))
    assert out.shape == (3, 224, 224)
    assert out[0].mean().item() == pytest.approx(-0.48145466 / 0.26862954, abs=1e-4)  # OpenAI CLIP stats


def test_csd_checkpoint_layout(tiny):
    checkpoint = torch.load(tiny["csd"], map_location="cpu", weights_only=False)
    state = checkpoint["model_state_dict"]
    assert all(key.startswith("module.") for key in state)
    for key in [
        "module.last_layer_style",
        "module.last_layer_content",
        "module.backbone.conv1.weight",
        "module.backbone.class_embedding",
        "module.backbone.positional_embedding",
        "module.backbone.ln_pre.weight",
        "module.backbone.transformer.resblocks.1.attn.in_proj_weight",
        "module.backbone.transformer.resblocks.1.mlp.c_proj.bias",
        "module.backbone.ln_post.bias",
    ]:
        assert key in state, key
    assert "module.backbone.proj" not in state  # CSD removes CLIP's projection
    assert state["module.last_layer_style"].shape == (64, 32)
    assert state["module.backbone.positional_embedding"].shape == (197, 64)  # (224 / 16)^2 + 1


def _write_csd(tmp_path, state: dict, name: str = "broken.pth"):
    path = tmp_path / name
    torch.save({"model_state_dict": state}, path)
    return path


def test_csd_rejects_mismatched_keys(tiny, tmp_path):
    state = torch.load(tiny["csd"], map_location="cpu", weights_only=False)["model_state_dict"]
    renamed = dict(state)
    renamed["module.backbone.ln_post.scale"] = renamed.pop("module.backbone.ln_post.weight")
    path = _write_csd(tmp_path, renamed)
    with pytest.raises(EncoderError) as error:
        _load("csd", str(path))
    message = str(error.value)
    assert str(path) in message and "metrics.csd.checkpoint" in message
    assert "backbone.ln_post.weight" in message and "backbone.ln_post.scale" in message
    # A key simply missing fails too.
    dropped = {k: v for k, v in state.items() if "resblocks.1.attn.out_proj.bias" not in k}
    with pytest.raises(EncoderError, match=r"resblocks\.1\.attn\.out_proj\.bias"):
        _load("csd", str(_write_csd(tmp_path, dropped, "dropped.pth")))


def test_csd_requires_the_style_head(tiny, tmp_path):
    state = torch.load(tiny["csd"], map_location="cpu", weights_only=False)["model_state_dict"]
    path = _write_csd(tmp_path, {k: v for k, v in state.items() if "last_layer_style" not in k})
    with pytest.raises(EncoderError, match="last_layer_style") as error:
        _load("csd", str(path))
    assert str(path) in str(error.value)


def test_csd_accepts_safetensors_and_plain_state_dicts(tiny, tmp_path):
    from safetensors.torch import save_file

    state = torch.load(tiny["csd"], map_location="cpu", weights_only=False)["model_state_dict"]
    expected = _load("csd", tiny["csd"]).embed_images(_images()[:2])
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "csd.safetensors")
    plain = tmp_path / "plain.pth"
    torch.save({k.removeprefix("module."): v for k, v in state.items()}, plain)
    for source in (tmp_path / "csd.safetensors", plain):
        assert torch.equal(_load("csd", str(source)).embed_images(_images()[:2]), expected)


def test_csd_missing_or_unreadable_file(tmp_path):
    missing = tmp_path / "nowhere" / "checkpoint.pth"
    with pytest.raises(EncoderError, match="metrics.csd.checkpoint") as error:
        _load("csd", str(missing))
    assert str(missing) in str(error.value)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderError, match="metrics.csd.checkpoint"):
        _load("csd", str(garbage))
    with pytest.raises(EncoderError, match="metrics.csd.checkpoint"):
        load_encoder("csd", {})


def test_missing_pretrained_dirs(tmp_path, tiny):
    missing = tmp_path / "no" / "dino"
    with pytest.raises(EncoderError, match="metrics.dino.pretrained") as error:
        _load("dino", str(missing))
    assert str(missing) in str(error.value)
    with pytest.raises(EncoderError, match="metrics.clip.pretrained"):
        _load("clip", str(tmp_path))  # exists but holds no model
    # A hub id that is not cached cannot be fetched offline (conftest sets HF_HUB_OFFLINE=1).
    with pytest.raises(EncoderError, match="metrics.dino.pretrained"):
        _load("dino", "nobody-here/no-such-model")
    # The wrong model's directory must not load as random weights.
    with pytest.raises(EncoderError, match="metrics.dino.pretrained"):
        _load("dino", tiny["clip"])
    with pytest.raises(EncoderError, match="unknown encoder"):
        load_encoder("lpips", {})
