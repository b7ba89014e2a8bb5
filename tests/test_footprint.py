"""lorachain.models.footprint: the counts from shapes on the meta device are those of real models
(instantiated, and wrapped by peft), the stored reference configs give the published sizes, and the
fold replay is the methods' own fold."""

from __future__ import annotations

import json
import struct

import pytest

from lorachain.models import footprint as fp
from lorachain.torch_env import torch

# Small configs of the three reference classes (every kind of targeted layer present: SD3's dual
# attention and last context-pre-only block, FLUX's joint and single blocks, SDXL's self and cross attention).
TINY_CONFIGS = {
    "sd3.5-medium": {
        "sample_size": 16,
        "patch_size": 2,
        "in_channels": 4,
        "out_channels": 4,
        "num_layers": 3,
        "attention_head_dim": 8,
        "num_attention_heads": 2,
        "joint_attention_dim": 24,
        "caption_projection_dim": 16,
        "pooled_projection_dim": 12,
        "pos_embed_max_size": 16,
        "dual_attention_layers": [0, 1],
        "qk_norm": "rms_norm",
    },
    "flux.1-dev": {
        "patch_size": 1,
        "in_channels": 8,
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": 8,
        "num_attention_heads": 2,
        "joint_attention_dim": 24,
        "pooled_projection_dim": 12,
        "guidance_embeds": True,
        "axes_dims_rope": [2, 2, 4],
    },
    "sdxl-base": {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [16, 32],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": [2, 4],
        "cross_attention_dim": 24,
        "norm_num_groups": 8,
        "transformer_layers_per_block": [1, 2],
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 4,
        "projection_class_embeddings_input_dim": 36,
    },
}


def real_model(name: str):
    import diffusers

    torch.manual_seed(0)
    return getattr(diffusers, fp.reference_model(name).denoiser_class).from_config(TINY_CONFIGS[name])


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_counts_from_the_meta_device_are_those_of_the_instantiated_model(name):
    figures = fp.footprint(name, TINY_CONFIGS[name])
    model = real_model(name)
    targets = fp.reference_model(name).targets
    linear = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and any(n.endswith("." + suffix) for suffix in targets)
    }
    assert [layer.name for layer in figures.layers] == sorted(linear)
    assert figures.denoiser_params == sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for key, b in model.state_dict().items() if key not in dict(model.named_parameters()))
    assert figures.denoiser_buffers == buffers
    assert figures.targeted_weights == sum(m.weight.numel() for m in linear.values())


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_lora_size_is_that_of_a_peft_injection(name, tmp_path):
    """rank * (in + out) fp32 parameters per targeted layer, as peft creates them for the same
    targets; the file size as safetensors writes them (the LoRA config metadata aside)."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    rank = 4
    figures = fp.footprint(name, TINY_CONFIGS[name])
    model = real_model(name)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(fp.reference_model(name).targets)))
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, LoraLayer))
    assert wrapped == [layer.name for layer in figures.layers]
    state = get_peft_model_state_dict(model)
    assert sum(t.numel() for t in state.values()) == figures.lora_params(rank)
    prefix = fp.reference_model(name).denoiser_prefix
    path = tmp_path / "lora.safetensors"
    save_file({f"{prefix}.{key}": t.float().contiguous() for key, t in state.items()}, path)
    assert sum(4 * t.numel() for t in state.values()) == figures.lora_tensor_bytes(rank)
    written = path.stat().st_size
    assert written == figures.lora_tensor_bytes(rank) + figures.lora_header_bytes(rank, metadata_bytes=0)
    header = json.loads(path.read_bytes()[8 : 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])
    assert len(header) == 2 * len(figures.layers)


def test_reference_configs_give_the_published_sizes():
    flux, sd35, sdxl = (fp.footprint(name) for name in ("flux.1-dev", "sd3.5-medium", "sdxl-base"))
    assert flux.denoiser_params == 11_901_408_320  # "12 B" FLUX.1-dev
    assert sd35.denoiser_elements == 2_469_663_936  # "2.5 B" SD3.5-medium, with its positional table
    assert (len(sdxl.layers), sdxl.targeted_weights) == (560, 955_187_200)  # lorachain.state, merge_base
    # FLUX: 19 joint blocks x 8 projections + 38 single blocks x to_q/k/v, all 3072 x 3072
    assert len(flux.layers) == 19 * 8 + 38 * 3
    assert {(layer.out_features, layer.in_features) for layer in flux.layers} == {(3072, 3072)}
    # SD3.5-medium: 24 joint blocks' attn (the last one has no to_add_out) + 13 dual-attention attn2
    assert len(sd35.layers) == 24 * 8 - 1 + 13 * 4
    assert sdxl.lora_params(64) == 92_897_280  # lorachain.state's "93 M parameters" at rank 64


def test_figures_are_deterministic():
    first, second = fp.footprint("sd3.5-medium"), fp.footprint("sd3.5-medium")
    assert first == second
    assert first.training_bytes(16) == second.training_bytes(16)
    assert first.chain_state_bytes(64, 10) == 10 * first.task_state_bytes(64)


def test_text_encoder_constants_are_the_published_models_sizes():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    clip_l.projection_dim = 768
    clip_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20)
    clip_g.projection_dim = 1280
    t5 = T5Config(
        d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128, feed_forward_proj="gated-gelu"
    )  # google/t5-v1_1-xxl
    with torch.device("meta"):
        counts = [
            sum(p.numel() for p in model.parameters())
            for model in (
                CLIPTextModel(clip_l),
                CLIPTextModelWithProjection(clip_l),
                CLIPTextModelWithProjection(clip_g),
                T5EncoderModel(t5),
            )
        ]
    assert counts == [fp.CLIP_L, fp.CLIP_L_PROJECTION, fp.CLIP_G, fp.T5_XXL_ENCODER]


def test_fold_chain_is_the_methods_fold():
    """merge_init sums the tasks' deltas; magmax keeps, per entry, the larger magnitude (ties: the
    later task); naive folds nothing."""
    from lorachain.methods import make_method

    layers = (fp.TargetedLayer("a", 6, 5), fp.TargetedLayer("b", 3, 7))
    chain = fp.synthetic_chain(layers, rank=2, tasks=4)
    deltas = {layer.name: torch.stack([task[layer.name].delta() for task in chain]) for layer in layers}
    summed = fp.fold_chain(make_method("merge_init"), chain)
    selected = fp.fold_chain(make_method("magmax"), chain)
    for name, stack in deltas.items():
        torch.testing.assert_close(summed[name], stack.sum(0))
        later_first = stack.flip(0)  # argmax takes the first maximum: flipped, the later task wins ties
        winner = later_first.abs().argmax(0, keepdim=True)
        torch.testing.assert_close(selected[name], later_first.gather(0, winner)[0])
    assert fp.fold_chain(make_method("naive"), chain) == {}


def test_measure_fold_and_live_tensor_estimate():
    layers = (fp.TargetedLayer("a", 64, 32), fp.TargetedLayer("b", 64, 32), fp.TargetedLayer("c", 16, 16))
    groups = fp.fold_subset(layers, per_shape=1)
    assert {shape: [layer.name for layer in members] for shape, members in groups.items()} == {
        (16, 16): ["c"],
        (64, 32): ["a"],
    }
    result = fp.measure_fold(groups, "magmax", rank=4, tasks=3, threads=1, repeats=2)
    assert set(result["seconds"]) == {(16, 16), (64, 32)} and all(s > 0 for s in result["seconds"].values())
    assert result["merged_bytes"] == 4 * (16 * 16 + 64 * 32)
    # folded deltas + 4.25 x the largest layer + one task's LoRA twice
    expected = 4 * (2 * 64 * 32 + 16 * 16) + 4.25 * 4 * 64 * 32 + 2 * 4 * 4 * (2 * 96 + 32)
    assert fp.fold_peak_bytes(layers, 4, "magmax") == int(expected)
