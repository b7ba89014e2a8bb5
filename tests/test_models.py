"""Tests of lorachain.models (offline CLIP tokenizer, tiny pipelines, loading) and of the
torchvision compatibility shim (lorachain._compat / lorachain.torch_env)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap

import pytest

from lorachain.models.loading import ModelError, load_pipeline
from lorachain.models.tiny import TINY_ARCHITECTURES, TRANSFORMER_ARCHITECTURES, build_tiny_pipeline
from lorachain.models.tokenizer import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, build_clip_tokenizer
from lorachain.torch_env import torch
from unet_inputs import unet_inputs

# ------------------------------------------------------------------------------------- tokenizer

# Ids of OpenAI's CLIP tokenizer (openai/clip-vit-large-patch14), as published.
KNOWN_IDS = {
    "a photo of": [49406, 320, 1125, 539, 49407],
    "a photo of sks sneaker": [49406, 320, 1125, 539, 48136, 24781, 49407],
}


def test_tokenizer_gives_openai_clip_ids():
    tokenizer = build_clip_tokenizer()
    for text, ids in KNOWN_IDS.items():
        assert tokenizer(text).input_ids == ids, text
    assert len(tokenizer) == CLIP_VOCAB_SIZE == 49408
    assert tokenizer.model_max_length == CLIP_MAX_LENGTH == 77
    assert tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [49406, 49407]
    assert tokenizer.pad_token_id == 49407
    padded = tokenizer("a photo of", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert len(padded) == 77 and padded[5:] == [49407] * 72
    # SDXL's second tokenizer pads with "!" (id 0), as the real one does.
    assert build_clip_tokenizer(pad_token="!").pad_token_id == 0


def test_tokenizer_matches_open_clip_simple_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    reference = SimpleTokenizer()
    tokenizer = build_clip_tokenizer()
    texts = [
        "a photo of sks sneaker",
        "Byzantine image of butterfly, in a jail.",
        "A  dog\twearing a SANTA hat!! 1234 don't",
        "caf\u00e9 na\u00efve r\u00e9sum\u00e9",
    ]
    for text in texts:
        assert tokenizer(text).input_ids == [49406, *reference.encode(text), 49407], text


# ---------------------------------------------------------------------------------- tiny models
# The diffusion transformers (sd3, flux, flux_schnell) are tested in test_tiny_transformers.py.
UNET_ARCHITECTURES = tuple(a for a in TINY_ARCHITECTURES if a not in TRANSFORMER_ARCHITECTURES)


def _assert_same_state_dict(a: torch.nn.Module, b: torch.nn.Module, what: str):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), what
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, (what, key)
        assert torch.equal(sa[key], sb[key]), (what, key)


@pytest.mark.parametrize("architecture", UNET_ARCHITECTURES)
def test_tiny_pipeline_saves_reloads_bit_identically_and_generates(architecture, request):
    saved = request.getfixturevalue(f"tiny_{architecture}_dir")
    built = build_tiny_pipeline(architecture, seed=0)
    loaded = load_pipeline(saved)
    assert type(loaded) is type(built)
    components = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if architecture == "sdxl" else [])
    for name in components:
        _assert_same_state_dict(getattr(built, name), getattr(loaded, name), name)
    assert loaded.unet.dtype == torch.float32
    # The saved tokenizer(s) still give the OpenAI ids.
    assert loaded.tokenizer("a photo of").input_ids == KNOWN_IDS["a photo of"]
    assert loaded.tokenizer.model_max_length == 77
    # Same U-Net output as the in-memory model.
    inputs = unet_inputs(built.unet)
    with torch.no_grad():
        assert torch.equal(built.unet(**inputs).sample, loaded.unet(**inputs).sample)
    # A 64 px image comes out (8x8 latents decoded by the 8x VAE).
    images = loaded(
        "a photo of sks backpack",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert images.shape == (1, 64, 64, 3)
    assert images.dtype.kind == "f" and (images >= 0).all() and (images <= 1).all()


def test_tiny_models_are_seeded():
    a, b, c = (build_tiny_pipeline("sd1", seed=s).unet.state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_tiny_sdxl_has_two_text_encoders_and_text_time_conditioning(tiny_sdxl_dir):
    pipe = load_pipeline(tiny_sdxl_dir)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipe.tokenizer_2 is not None and pipe.tokenizer_2.pad_token == "!"
    config = pipe.unet.config
    assert config.addition_embed_type == "text_time"
    hidden = pipe.text_encoder.config.hidden_size
    # The U-Net attends to both encoders' states concatenated...
    assert config.cross_attention_dim == hidden + pipe.text_encoder_2.config.hidden_size
    # ...and is conditioned on the pooled projection plus six size/crop numbers.
    assert (
        config.projection_class_embeddings_input_dim
        == 6 * config.addition_time_embed_dim + pipe.text_encoder_2.config.projection_dim
    )
    embeds, _, pooled, _ = pipe.encode_prompt(
        "a photo of", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    assert embeds.shape == (1, 77, config.cross_attention_dim)
    assert pooled.shape == (1, pipe.text_encoder_2.config.projection_dim)
    # The time ids really condition the output.
    inputs = unet_inputs(pipe.unet, batch=1)
    with torch.no_grad():
        first = pipe.unet(**inputs).sample
        inputs["added_cond_kwargs"]["time_ids"] = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 64.0, 64.0]])
        second = pipe.unet(**inputs).sample
        # text_time conditioning is required: without added_cond_kwargs, diffusers' get_aug_embed tests
        # `"text_embeds" in added_cond_kwargs` on None, a TypeError
        with pytest.raises(TypeError):
            pipe.unet(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"])
    assert not torch.allclose(first, second)


def test_tiny_sd1_has_no_added_conditioning(tiny_sd1_dir):
    pipe = load_pipeline(tiny_sd1_dir)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.unet.config.addition_embed_type is None
    assert not hasattr(pipe, "text_encoder_2")
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size


def test_unknown_tiny_architecture():
    with pytest.raises(ValueError, match="'sd2'.*choose one of") as info:
        build_tiny_pipeline("sd2")
    assert all(name in str(info.value) for name in TINY_ARCHITECTURES)


# -------------------------------------------------------------------------------------- loading


def test_load_pipeline_missing_local_path(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ModelError) as info:
        load_pipeline(missing)
    assert str(missing) in str(info.value) and "model.pretrained" in str(info.value)
    with pytest.raises(ModelError, match="model.vae"):
        load_pipeline(missing, vae=str(tmp_path / "no_such_vae"))


@pytest.mark.parametrize("source", ["plainname", "./relative/missing", "a/b/c", "owner/"])
def test_load_pipeline_neither_directory_nor_hub_id(source):
    with pytest.raises(ModelError, match="neither an existing directory nor a hub id") as info:
        load_pipeline(source)
    assert repr(source) in str(info.value)


def test_load_pipeline_file_and_empty_directory(tmp_path):
    a_file = tmp_path / "model.safetensors"
    a_file.write_bytes(b"not a pipeline")
    with pytest.raises(ModelError, match="is a file"):
        load_pipeline(a_file)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="as a directory"):
        load_pipeline(empty)


def test_a_damaged_tiny_model_names_model_tiny_and_how_to_rebuild_it(tmp_path):
    """A pipeline the workflow built (rule build_tiny_model) is blamed on model.tiny, not on a
    model.pretrained the config never set, and the message says that deleting it rebuilds it."""
    from lorachain.models.tiny import save_tiny_pipeline

    built = save_tiny_pipeline("sd1", tmp_path / "resources" / "models" / "tiny-sd1", config_key="model.tiny")
    (built / "unet" / "config.json").unlink()
    with pytest.raises(ModelError) as info:
        load_pipeline(built)
    message = str(info.value)
    assert message.startswith(f"config key model.tiny (built by the workflow in {built}): cannot load")
    assert message.endswith(f"; delete {built} and rerun: the workflow builds it again")
    assert "model.pretrained" not in message


def test_load_pipeline_uncached_hub_id_offline():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(ModelError, match="offline") as info:
        load_pipeline("lorachain-test-nobody/no-such-model", key="model.pretrained")
    assert "lorachain-test-nobody/no-such-model" in str(info.value)


# ---------------------------------------------------------------------------------- torch compat


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=120
    )


def test_torch_env_makes_torchvision_open_clip_timm_importable():
    shimmed = _fresh_python(
        """
        import json, sys
        import lorachain.torch_env as env
        import torchvision, open_clip, timm
        import torchvision.transforms
        print(json.dumps({"status": env.TORCHVISION_STATUS, "tv": "torchvision" in sys.modules}))
        """
    )
    assert shimmed.returncode == 0, shimmed.stderr[-3000:]
    result = json.loads(shimmed.stdout.strip().splitlines()[-1])
    assert result["status"] in ("declared", "native"), result
    assert result["tv"]

    if result["status"] == "native":
        pytest.skip("torchvision's compiled ops load on this machine: the shim is not needed, nothing to prove")
    plain = _fresh_python("import torchvision")
    assert plain.returncode != 0, "torchvision imported without the shim, yet the shim reported 'declared'"
    assert "torchvision::nms" in plain.stderr


def test_ensure_torchvision_importable_after_import_and_twice():
    from lorachain._compat import ensure_torchvision_importable

    out = _fresh_python(
        """
        from lorachain._compat import ensure_torchvision_importable as ensure
        first = ensure(); second = ensure()
        import torchvision
        print(first, second, ensure())
        """
    )
    assert out.returncode == 0, out.stderr[-3000:]
    first, second, third = out.stdout.split()
    assert first in ("declared", "native") and second in ("declared", "native")
    assert third == "already-imported"
    # In this process torch_env ran at import time.
    from lorachain.torch_env import TORCHVISION_STATUS

    assert TORCHVISION_STATUS in ("declared", "native", "already-imported")
    assert ensure_torchvision_importable() in ("declared", "native", "already-imported")


def test_no_cuda_distributions_installed():
    names = sorted({(dist.metadata["Name"] or "").lower() for dist in importlib.metadata.distributions()})
    assert names, "no distributions found"
    assert "torch" in names
    offending = [n for n in names if n.startswith(("nvidia-", "nvidia_", "cuda-", "cuda_")) or n == "triton"]
    assert not offending, offending
    assert "+cpu" in torch.__version__ or not torch.version.cuda, torch.__version__
