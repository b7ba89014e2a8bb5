"""Third-party LoRA files: kohya / A1111 and peft layouts read as lorachain's own.

Every expected delta is peft's own (``LoraLayer.get_delta_weight``) on a tiny U-Net with a LoRA of
several ranks and alphas; the kohya files are written by diffusers' ``convert_state_dict_to_kohya``
with per-layer alphas that differ from the rank (the up factor rescaled so the delta is unchanged),
so a wrong alpha scale or a wrong key map makes the comparison fail."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lorachain.cli import main
from lorachain.lora import LoraFileError, check_compatible, check_fits_unet, read_lora
from lorachain.models import tiny
from lorachain.torch_env import torch

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


def lora_config(extra_targets=()):
    from peft import LoraConfig

    return LoraConfig(
        r=4,
        lora_alpha=8,
        rank_pattern={"to_k": 2},
        alpha_pattern={"to_v": 3, "ff.net.2": 16},
        target_modules=[*TARGETS, *extra_targets],
        init_lora_weights=False,  # random B: every delta is non-zero
    )


def tiny_unet(architecture: str, seed: int = 0):
    return tiny.build_tiny_pipeline(architecture, seed=seed).unet


def unet_with_lora(architecture: str = "sd1", seed: int = 0, extra_targets=()):
    unet = tiny_unet(architecture, seed)
    torch.manual_seed(seed + 100)
    unet.add_adapter(lora_config(extra_targets))
    return unet


def peft_deltas(model) -> dict:
    """layer -> delta, as peft computes it, for every LoRA layer of `model`."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            (adapter,) = module.active_adapters
            deltas[name.removeprefix("base_model.model.")] = module.get_delta_weight(adapter).detach()
    return deltas


def peft_state_dict(unet) -> dict:
    from peft.utils import get_peft_model_state_dict

    return {key: value.detach().clone() for key, value in get_peft_model_state_dict(unet).items()}


def peft_scales(unet) -> dict:
    from peft.tuners.lora import LoraLayer

    return {
        name: module.scaling[module.active_adapters[0]]
        for name, module in unet.named_modules()
        if isinstance(module, LoraLayer)
    }


def write_kohya(path, unet, text_encoder_keys: bool = False):
    """`unet`'s LoRA as a kohya file (diffusers' converter), layer i with alpha = rank * (0.5 + i % 3)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    state, scales, kohya = peft_state_dict(unet), peft_scales(unet), {}
    for index, layer in enumerate(sorted(scales)):
        A, B = state[f"{layer}.lora_A.weight"], state[f"{layer}.lora_B.weight"]
        part = convert_state_dict_to_kohya({f"unet.{layer}.lora_A.weight": A, f"unet.{layer}.lora_B.weight": B})
        alpha = A.shape[0] * (0.5 + index % 3)
        for key in part:
            if key.endswith(".alpha"):
                part[key] = torch.tensor(alpha)
            elif key.endswith(".lora_up.weight"):  # kohya's delta = alpha / r * up @ down
                part[key] = (B * scales[layer] * A.shape[0] / alpha).contiguous()
        kohya |= part
    if text_encoder_keys:
        kohya |= convert_state_dict_to_kohya(
            {
                "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 32),
                "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(32, 2),
            }
        )
    save_file(kohya, str(path))
    return path


def write_diffusers(directory, unet):
    """`unet`'s LoRA as lorachain / diffusers write it (save_lora_weights with the LoraConfig)."""
    from diffusers import StableDiffusionPipeline

    config = unet.peft_config["default"].to_dict()
    config["target_modules"] = sorted(config["target_modules"])
    StableDiffusionPipeline.save_lora_weights(
        directory, unet_lora_layers=peft_state_dict(unet), unet_lora_adapter_metadata=config
    )
    return directory / "pytorch_lora_weights.safetensors"


def assert_same_deltas(lora, expected: dict) -> None:
    assert sorted(lora.adapters) == sorted(expected)
    for layer, delta in expected.items():
        torch.testing.assert_close(lora.delta(layer), delta.float(), rtol=1e-5, atol=1e-6, msg=layer)


@pytest.fixture(scope="module")
def sd1_unet():
    return unet_with_lora("sd1")


def test_kohya_file_reads_as_the_deltas_it_was_made_from(tmp_path, sd1_unet):
    path = write_kohya(tmp_path / "kohya.safetensors", sd1_unet, text_encoder_keys=True)
    lora = read_lora(path)
    assert_same_deltas(lora, peft_deltas(sd1_unet))
    assert lora.alpha is None  # per-layer alphas differ
    assert any("per-layer .alpha" in note for note in lora.notes)
    assert any("ignored 2 key(s) of text_encoder" in note for note in lora.notes)
    check_fits_unet(lora, tiny_unet("sd1"))


def test_peft_layout_file_with_adapter_config_beside_it(tmp_path):
    from peft import get_peft_model

    torch.manual_seed(7)
    model = get_peft_model(tiny_unet("sd1"), lora_config())
    model.save_pretrained(tmp_path / "peft")
    path = tmp_path / "peft" / "adapter_model.safetensors"
    lora = read_lora(path)
    assert_same_deltas(lora, peft_deltas(model))
    assert lora.metadata["lora_alpha"] == 8 and lora.metadata["alpha_pattern"] == {"to_v": 3, "ff.net.2": 16}


def test_inspect_compares_a_kohya_and_a_diffusers_file(tmp_path, sd1_unet, capsys):
    """The same LoRA in two layouts: identical deltas, so every layer's cosine is 1."""
    import pandas as pd

    kohya = write_kohya(tmp_path / "kohya.safetensors", sd1_unet)
    diffusers_file = write_diffusers(tmp_path / "diffusers", sd1_unet)
    assert main(["inspect", str(kohya), str(diffusers_file), "--out", str(tmp_path / "report")]) == 0
    assert f"{len(peft_deltas(sd1_unet))} layers each" in capsys.readouterr().out
    cosine = pd.read_csv(tmp_path / "report" / "cosine.csv")
    assert cosine["mean_cosine"].min() == pytest.approx(1.0, abs=1e-5)


def test_unreadable_files_name_the_file(tmp_path):
    from safetensors.torch import save_file

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(LoraFileError, match=r"garbage\.safetensors: not a readable safetensors file"):
        read_lora(garbage)
    checkpoint = tmp_path / "checkpoint.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, str(checkpoint))
    with pytest.raises(LoraFileError, match=r"checkpoint\.safetensors: key .* is not a LoRA factor .*kohya"):
        read_lora(checkpoint)
    orphan = tmp_path / "orphan.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(2, 2)}, str(orphan))
    with pytest.raises(LoraFileError, match=r"orphan\.safetensors: not a kohya LoRA file diffusers can convert"):
        read_lora(orphan)
    dora = tmp_path / "dora.safetensors"
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    factors = {f"{name}.lora_down.weight": torch.zeros(1, 2), f"{name}.lora_up.weight": torch.zeros(2, 1)}
    save_file({**factors, f"{name}.dora_scale": torch.ones(1, 2)}, str(dora))
    with pytest.raises(LoraFileError, match=r"dora\.safetensors: key .*dora_scale' is a DoRA magnitude"):
        read_lora(dora)


def test_kohya_file_of_another_architecture_is_refused(tmp_path, sd1_unet):
    """The tiny SDXL U-Net has a second transformer block in its second level and wider cross-attention."""
    sdxl = read_lora(write_kohya(tmp_path / "sdxl.safetensors", unet_with_lora("sdxl")))
    sd1 = read_lora(write_kohya(tmp_path / "sd1.safetensors", sd1_unet))
    with pytest.raises(LoraFileError, match=r"sd1\.safetensors and .*sdxl\.safetensors adapt different layers"):
        check_compatible([sd1, sdxl])
    sd1_base = tiny_unet("sd1")
    with pytest.raises(LoraFileError, match=r"sdxl\.safetensors: layer '.*'"):
        check_fits_unet(sdxl, sd1_base)
    extra_block = {layer: a for layer, a in sdxl.adapters.items() if ".transformer_blocks.1." in layer}
    assert extra_block
    with pytest.raises(LoraFileError, match=r"sdxl\.safetensors: layer '.*transformer_blocks\.1\..*' is not a linear"):
        check_fits_unet(replace(sdxl, adapters=extra_block), sd1_base)
    cross = {layer: a for layer, a in sdxl.adapters.items() if layer.endswith("attn2.to_k")}
    with pytest.raises(LoraFileError, match=r"sdxl\.safetensors: layer '.*attn2\.to_k' has delta shape \(out, in\)"):
        check_fits_unet(replace(sdxl, adapters=cross), sd1_base)


def test_inspect_with_a_base_model_refuses_a_file_of_another_architecture(tmp_path, sd1_unet, tiny_sd1_dir, capsys):
    sd1 = write_kohya(tmp_path / "sd1.safetensors", sd1_unet)
    diffusers_file = write_diffusers(tmp_path / "diffusers", sd1_unet)
    assert main(["inspect", str(sd1), str(diffusers_file), "--base", str(tiny_sd1_dir)]) == 0
    sdxl_unet = unet_with_lora("sdxl")
    sdxl = [write_kohya(tmp_path / f"sdxl{i}.safetensors", sdxl_unet) for i in range(2)]
    capsys.readouterr()
    assert main(["inspect", *map(str, sdxl), "--base", str(tiny_sd1_dir)]) == 2
    error = capsys.readouterr().err
    assert "sdxl0.safetensors: layer '" in error and f"(--base {tiny_sd1_dir})" in error
    assert main(["inspect", *map(str, sdxl), "--base", str(tmp_path)]) == 2
    assert f"--base {tmp_path}: no diffusers U-Net config there" in capsys.readouterr().err
