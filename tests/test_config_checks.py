"""The checks the Snakefile makes while parsing: model paths that must exist, numbers YAML read as text."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lorachain.config_checks import ConfigError, check_model_sources, model_source_problems, number_string_hints

ROOT = Path(__file__).resolve().parents[1]
ALL_ENCODERS = ["clip", "csd", "dino"]


def paper_config() -> dict:
    """config/config.yaml with the defaults the schema fills in (tiny_seed: 0 in every metric block)."""
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    for name in ALL_ENCODERS:
        config["metrics"][name]["tiny_seed"] = 0
    return config


def test_hub_ids_and_the_schema_defaults_pass(tmp_path, monkeypatch):
    """The paper config names DINO and CLIP by hub id and CSD by a local file: only the file is
    checked, and `tiny_seed: 0` (filled in by the schema) is not taken for a path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "csd").mkdir(parents=True)
    (tmp_path / "data" / "csd" / "checkpoint.pth").touch()
    assert model_source_problems(paper_config(), ALL_ENCODERS) == []


def test_local_directories_pass_and_missing_ones_are_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = paper_config()
    (tmp_path / "models" / "dino").mkdir(parents=True)
    (tmp_path / "csd.pth").touch()
    config["metrics"]["dino"]["pretrained"] = "models/dino"  # owner/name-shaped, but it exists: a directory
    config["metrics"]["clip"]["pretrained"] = "./models/clip"  # not a hub id and missing
    config["metrics"]["csd"]["checkpoint"] = str(tmp_path / "csd.pth")
    config["model"]["pretrained"] = str(tmp_path / "sdxl")  # absolute, missing
    problems = model_source_problems(config, ALL_ENCODERS)
    assert len(problems) == 2, problems
    assert problems[0].startswith(
        f"config key model.pretrained: '{tmp_path / 'sdxl'}' does not exist and is not a hub id"
    )
    assert problems[1].startswith(
        "config key metrics.clip.pretrained: './models/clip' does not exist and is not a hub id"
    )


def test_a_missing_csd_checkpoint_is_named_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as error:
        check_model_sources(paper_config(), ALL_ENCODERS)
    message = str(error.value)
    assert message == (
        "config key metrics.csd.checkpoint: 'data/csd/checkpoint.pth' does not exist; "
        "give the path of the downloaded file "
        f"(relative paths are read from {tmp_path})"
    )


def test_a_file_where_a_directory_belongs_and_unused_or_tiny_encoders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = paper_config()
    (tmp_path / "vae.safetensors").touch()
    config["model"]["vae"] = "vae.safetensors"
    config["metrics"]["csd"] = {"tiny": True, "tiny_seed": 0}
    config["metrics"]["clip"]["pretrained"] = "nowhere/at/all"  # not used by the domains below
    problems = model_source_problems(config, ["csd", "dino"])
    assert problems == [
        "config key model.vae: 'vae.safetensors' is a file; "
        "give the directory written by save_pretrained (or a hub id owner/name)"
    ]


def test_unquoted_exponents_get_the_yaml_spelling():
    hints = number_string_hints(
        {"training": {"learning_rate": "1e-4", "optimizer": {"eps": "1.0e8"}}, "tokens": ["sks"], "n": "5"}
    )
    assert hints == [
        "config key training.learning_rate: '1e-4' was read as text, not a number "
        "(YAML reads exponent notation as a number only with a decimal point and a signed exponent); write 1.0e-4",
        "config key training.optimizer.eps: '1.0e8' was read as text, not a number "
        "(YAML reads exponent notation as a number only with a decimal point and a signed exponent); write 1.0e+8",
    ]
    assert (
        yaml.safe_load("x: 1.0e-4\ny: 1.0e+8")["x"] == 1e-4 and yaml.safe_load("y: 1.0e+8")["y"] == 1e8
    )  # the fixes parse


SDXL_UNET = {  # the fields of stabilityai/stable-diffusion-xl-base-1.0's unet/config.json that matter here
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "cross_attention_dim": 2048,
}


def test_the_narrowest_targeted_width_is_read_from_the_unet_config():
    from lorachain.models.widths import narrowest_targeted_width

    assert narrowest_targeted_width(SDXL_UNET, ["to_q", "to_k", "to_v", "to_out.0"]) == 640
    assert narrowest_targeted_width({**SDXL_UNET, "cross_attention_dim": 512}, ["to_k"]) == 512
    assert narrowest_targeted_width(SDXL_UNET, ["proj_in"]) is None


@pytest.mark.parametrize("architecture", ["sd1", "sdxl"])
def test_the_width_from_the_config_is_the_loaded_unets(architecture, request):
    """The config-only reading agrees with the targeted layers of the loaded model."""
    import json

    from lorachain.models.loading import load_pipeline
    from lorachain.models.widths import narrowest_targeted_width
    from lorachain.training.adapters import lora_layers

    directory = request.getfixturevalue(f"tiny_{architecture}_dir")
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    unet = load_pipeline(str(directory)).unet
    modules = dict(unet.named_modules())
    widths = [modules[name].in_features for name in lora_layers(unet, targets)]
    config = json.loads((directory / "unet" / "config.json").read_text())
    assert narrowest_targeted_width(config, targets) == min(widths)


@pytest.mark.parametrize("architecture", ["sd3", "flux"])
def test_the_width_from_a_transformer_config_is_the_loaded_transformers(architecture, request):
    """SD3 / FLUX: the config-only width is the narrowest input of the default targeted layers."""
    import json

    from lorachain.config_checks import _narrowest_targeted_width
    from lorachain.models.loading import load_pipeline
    from lorachain.models.widths import transformer_targeted_width
    from lorachain.training.adapters import lora_layers

    directory = request.getfixturevalue(f"tiny_{architecture}_dir")
    transformer = load_pipeline(str(directory)).transformer
    widths = {module.in_features for module in lora_layers(transformer, None).values()}
    config = json.loads((directory / "transformer" / "config.json").read_text())
    assert transformer_targeted_width(config) == min(widths)
    workflow_config = {"model": {"pretrained": str(directory)}, "training": {"rank": 4}}
    assert _narrowest_targeted_width(workflow_config) == min(widths)


def test_coordinated_orthogonal_columns_beyond_the_narrowest_layer_fail_the_check_naming_the_key(tiny_sd1_dir):
    import json

    from lorachain.config_checks import registered_block_problems
    from lorachain.models.widths import narrowest_targeted_width

    narrowest = narrowest_targeted_width(
        json.loads((tiny_sd1_dir / "unet" / "config.json").read_text()), ["to_q", "to_k", "to_v", "to_out.0"]
    )
    config = yaml.safe_load((ROOT / "config" / "tiny.yaml").read_text())
    config["model"] = {"pretrained": str(tiny_sd1_dir)}
    config["training"].update(rank=narrowest // 2, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    config["modular"]["adapters"]["orthogonal"]["columns"] = "coordinated"  # 3 concepts, 2 fit
    problems = registered_block_problems(config)
    assert len(problems) == 1 and problems[0].startswith("config key modular.adapters.orthogonal:"), problems
    assert "set modular.adapters.orthogonal.columns: auto or random" in problems[0]
    config["modular"]["adapters"]["orthogonal"]["columns"] = "auto"
    assert registered_block_problems(config) == []
