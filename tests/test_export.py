"""lorachain export: a stock diffusers pipeline that loads an exact export (diffusers or kohya keys)
computes lorachain's own model of the state; SVD exports report the error a direct computation
gives; bad input is refused naming the file or flag."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorachain.export import (
    DIFFUSERS_FILE,
    ERRORS_FILE,
    KOHYA_FILE,
    RECORD_FILE,
    UNET_DIR,
    ExportError,
    SvdSettings,
    export_merge,
    export_state,
)
from lorachain.lora import LayerAdapter
from lorachain.methods import make_merge, make_method
from lorachain.methods.blocklora import block_mask
from lorachain.state import (
    STATE_FILE,
    ConceptEmbeddings,
    FoldedState,
    StateError,
    apply_to_unet,
    fold_state,
    write_task_state,
)
from lorachain.torch_env import torch
from unet_inputs import unet_inputs

RANK, ALPHA = 2, 4  # scale alpha / r = 2: the export must fold it into the factors
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def attention_layers(unet) -> dict[str, tuple[int, int]]:
    return {
        name: (module.out_features, module.in_features)
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear) and name.endswith(TARGETS) and ".attn" in name
    }


@pytest.fixture(scope="module")
def sd1(tiny_sd1_dir):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd1_dir, subfolder="unet")
    return {"dir": tiny_sd1_dir, "layers": attention_layers(unet)}


def write_task(directory, sd1, *, method, params, index, seed, slot=0, num_blocks=None, embeddings=None) -> Path:
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    generator = torch.Generator().manual_seed(seed)
    adapters = {}
    for name, (n_out, n_in) in sd1["layers"].items():
        B = torch.randn(n_out, RANK, generator=generator) * 0.05
        if num_blocks is not None:
            B = B * block_mask(n_out, num_blocks, slot)
        adapters[name] = LayerAdapter(A=torch.randn(RANK, n_in, generator=generator), B=B, scale=ALPHA / RANK)
    manifest = {
        "task_index": index,
        "parent": f"../task{index - 1:02d}" if index > 1 else None,
        "method": {"name": method, "params": params},
        "run": {"seed": 0},
        "base_model": str(sd1["dir"]),
        "architecture": "StableDiffusionPipeline",
        "rank": RANK,
        "lora_alpha": ALPHA,
        "slot": slot,
        "concept": f"concept{seed}",
        "train_prompt": f"a photo of sks{seed} thing",
    }
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS)).to_dict()
    write_task_state(directory, adapters, manifest, StableDiffusionPipeline, config, embeddings)
    return Path(directory)


def write_chain(root: Path, sd1, method: str, tasks: int = 3, params=None) -> Path:
    for index in range(1, tasks + 1):
        last = write_task(root / f"task{index:02d}", sd1, method=method, params=params or {}, index=index, seed=index)
    return last


def write_concepts(root: Path, sd1, count=3, num_blocks=4) -> list[Path]:
    return [
        write_task(
            root / f"concept{slot + 1:02d}",
            sd1,
            method="blocklora",
            params={"num_blocks": num_blocks, "erasure": 0.25, "blockwise": True},
            index=1,
            seed=10 + slot,
            slot=slot,
            num_blocks=num_blocks,
        )
        for slot in range(count)
    ]


def reference_output(model_dir, state: FoldedState):
    """lorachain's own model of the state: the base U-Net with the folded delta added."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    apply_to_unet(unet, state)
    with torch.no_grad():
        return unet(**unet_inputs(unet)).sample


def diffusers_output(model_dir, export_dir, weight_name=DIFFUSERS_FILE):
    """The output of a stock pipeline's U-Net after load_lora_weights of the exported file."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.load_lora_weights(str(export_dir), weight_name=weight_name)
    with torch.no_grad():
        return pipe.unet(**unet_inputs(pipe.unet)).sample


def base_output(model_dir):
    return reference_output(model_dir, FoldedState(tasks_done=0))


def assert_same_model(actual, expected, base):
    # the LoRA must matter (else the comparison proves nothing) and be reproduced
    assert (expected - base).abs().max() > 1e-3
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)


def test_merge_init_over_three_tasks_exports_exactly_in_diffusers_and_kohya_keys(sd1, tmp_path):
    last = write_chain(tmp_path / "run", sd1, "merge_init")
    record = export_state(last, tmp_path / "out", formats=("diffusers", "kohya"))
    assert record["exact"] and record["rank"] == {"min": 3 * RANK, "max": 3 * RANK}
    expected = reference_output(sd1["dir"], fold_state(last, make_method("merge_init")))
    base = base_output(sd1["dir"])
    assert_same_model(diffusers_output(sd1["dir"], tmp_path / "out"), expected, base)
    assert_same_model(diffusers_output(sd1["dir"], tmp_path / "out", KOHYA_FILE), expected, base)
    with safe_open(tmp_path / "out" / KOHYA_FILE, "pt") as handle:
        assert all(key.startswith("lora_unet_") for key in handle.keys())
        assert handle.metadata()["lorachain.rank"] == str(3 * RANK)
        assert json.loads(handle.metadata()["lorachain.concepts"]) == ["concept1", "concept2", "concept3"]


@pytest.mark.slow
def test_a_blocklora_merge_exports_exactly(sd1, tmp_path):
    from lorachain.modular import load_concept

    dirs = write_concepts(tmp_path / "concepts", sd1)
    for weights in (1.0, "mean"):
        out = tmp_path / f"out-{weights}"
        formats = ("diffusers", "kohya")
        record = export_merge(dirs, "blocklora", {"weights": weights}, out, merge_key="m", formats=formats)
        assert record["exact"] and record["rank"]["max"] == 3 * RANK
        merged = make_merge("blocklora", {"weights": weights}).merge([load_concept(d)[0] for d in dirs])
        expected = reference_output(sd1["dir"], FoldedState(tasks_done=3, merged=merged))
        base = base_output(sd1["dir"])
        assert_same_model(diffusers_output(sd1["dir"], out), expected, base)
        assert_same_model(diffusers_output(sd1["dir"], out, KOHYA_FILE), expected, base)


def test_the_fused_unet_is_the_base_with_the_folded_delta(sd1, tmp_path):
    from diffusers import UNet2DConditionModel

    last = write_chain(tmp_path / "run", sd1, "naive", tasks=2)
    record = export_state(last, tmp_path / "out", formats=("unet",))
    assert record["exact"] and record["rank"]["max"] == RANK  # naive: the live adapter is the model
    fused = UNet2DConditionModel.from_pretrained(tmp_path / "out" / UNET_DIR)
    expected = UNet2DConditionModel.from_pretrained(sd1["dir"], subfolder="unet")
    apply_to_unet(expected, fold_state(last, make_method("naive")))
    for (name, actual), wanted in zip(fused.state_dict().items(), expected.state_dict().values()):
        assert torch.equal(actual, wanted), name


def direct_errors(export_dir: Path, deltas: dict) -> tuple[dict, float]:
    """||dW - B A||_F / ||dW||_F per layer and overall, from the written file, in float64."""
    tensors = load_file(export_dir / DIFFUSERS_FILE)
    errors, residual, total = {}, 0.0, 0.0
    for layer, delta in deltas.items():
        A = tensors[f"unet.{layer}.lora_A.weight"].double()
        B = tensors[f"unet.{layer}.lora_B.weight"].double()
        difference = float(torch.linalg.norm(delta.double() - B @ A)) ** 2
        norm = float(torch.linalg.norm(delta.double())) ** 2
        errors[layer] = math.sqrt(difference / norm)
        residual, total = residual + difference, total + norm
    return errors, math.sqrt(residual / total)


def test_an_svd_export_reports_the_error_a_direct_computation_gives(sd1, tmp_path):
    last = write_chain(tmp_path / "run", sd1, "magmax")
    state = fold_state(last, make_method("magmax"))
    deltas = {layer: state.layer_delta(layer) for layer in state.layers()}
    record = export_state(last, tmp_path / "r2", formats=("diffusers",), svd=SvdSettings(rank=2))
    assert not record["exact"] and record["rank"] == {"min": 2, "max": 2}
    errors, overall = direct_errors(tmp_path / "r2", deltas)
    assert record["relative_error"] == pytest.approx(overall, rel=1e-4) and overall > 0.05
    with open(tmp_path / "r2" / ERRORS_FILE) as handle:
        rows = {row["layer"]: float(row["relative_error"]) for row in csv.DictReader(handle)}
    assert rows.keys() == errors.keys()
    for layer, error in errors.items():
        assert rows[layer] == pytest.approx(error, rel=1e-4, abs=1e-6)
    record = export_state(last, tmp_path / "full", formats=("diffusers",), svd=SvdSettings(energy=1.0))
    assert record["relative_error"] < 1e-5 and direct_errors(tmp_path / "full", deltas)[1] < 1e-5
    narrowest = min(min(shape) for shape in sd1["layers"].values())
    record = export_state(last, tmp_path / "narrow", formats=("diffusers",), svd=SvdSettings(rank=narrowest))
    at_full_rank = {layer for layer, shape in sd1["layers"].items() if min(shape) == narrowest}
    assert max(direct_errors(tmp_path / "narrow", {layer: deltas[layer] for layer in at_full_rank})[0].values()) < 1e-5


def test_an_energy_svd_export_of_layers_of_different_ranks_loads_in_diffusers(sd1, tmp_path):
    last = write_chain(tmp_path / "run", sd1, "magmax")
    record = export_state(last, tmp_path / "out", formats=("diffusers",), svd=SvdSettings(energy=0.9))
    assert record["rank"]["min"] < record["rank"]["max"]  # a rank_pattern diffusers must infer
    tensors = load_file(tmp_path / "out" / DIFFUSERS_FILE)
    layers = {key[len("unet.") : -len(".lora_A.weight")] for key in tensors if key.endswith(".lora_A.weight")}
    merged = {
        layer: tensors[f"unet.{layer}.lora_B.weight"] @ tensors[f"unet.{layer}.lora_A.weight"] for layer in layers
    }
    expected = reference_output(sd1["dir"], FoldedState(tasks_done=3, merged=merged))
    assert_same_model(diffusers_output(sd1["dir"], tmp_path / "out"), expected, base_output(sd1["dir"]))


def test_exports_are_byte_identical_and_carry_metadata_card_and_embeddings(sd1, tmp_path):
    width = 32
    embeddings = ConceptEmbeddings(token="<sks1>", phrase="sks1 thing", vectors={"clip_l": torch.ones(1, width)})
    directory = write_task(
        tmp_path / "run" / "task01", sd1, method="merge_init", params={}, index=1, seed=1, embeddings=embeddings
    )
    first = export_state(directory, tmp_path / "a", formats=("diffusers", "kohya"))
    export_state(directory, tmp_path / "b", formats=("diffusers", "kohya"))
    for name in (DIFFUSERS_FILE, KOHYA_FILE, RECORD_FILE, "README.md", "embeddings-sks1.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert first["embeddings"] == [{"token": "<sks1>", "file": "embeddings-sks1.safetensors"}]
    card = (tmp_path / "a" / "README.md").read_text()
    assert "load_textual_inversion" in card and "<sks1>" in card and str(sd1["dir"]) in card
    with safe_open(tmp_path / "a" / DIFFUSERS_FILE, "pt") as handle:
        metadata = handle.metadata()
    assert metadata["lorachain.base_model"] == str(sd1["dir"])
    assert json.loads(metadata["lorachain.method"]) == {"name": "merge_init", "params": {}}
    assert json.loads(metadata["lorachain.tokens"]) == ["<sks1>"]


def test_exactness_comes_from_the_methods_declarations():
    adapter = LayerAdapter(A=torch.ones(1, 2), B=torch.ones(2, 1), scale=1.0)
    assert make_method("ortho_init").folded_terms([adapter, adapter]) == [(1.0, adapter), (1.0, adapter)]
    assert make_method("magmax").folded_terms([adapter]) is None  # its own fold, no declared terms
    assert make_method("naive").folded_terms([adapter]) == []  # only the live adapter
    assert make_merge("ties").low_rank_terms("layer", [], []) is None


# ------------------------------------------------------------------ refused


def test_an_unfinished_state_is_refused_naming_the_file(sd1, tmp_path):
    last = write_chain(tmp_path / "run", sd1, "merge_init", tasks=2)
    (tmp_path / "run" / "task01" / STATE_FILE).unlink()
    with pytest.raises(StateError, match=r"task01/state.json: state manifest missing"):
        export_state(last, tmp_path / "out")
    (last / DIFFUSERS_FILE).unlink()
    with pytest.raises(StateError, match=r"task02/pytorch_lora_weights.safetensors: LoRA file .* missing"):
        export_state(last, tmp_path / "out")


def test_a_merge_that_was_not_run_is_refused(sd1, tmp_path):
    dirs = write_concepts(tmp_path / "concepts", sd1, count=2)
    missing = tmp_path / "concepts" / "concept03"
    with pytest.raises(ExportError, match=r"concept03/state.json: concept 3 of modular.merges.b .* not run"):
        export_merge([*dirs, missing], "blocklora", {}, tmp_path / "out", merge_key="modular.merges.b")
    with pytest.raises(ExportError, match=r"concept01/grams-images.safetensors: modular.merges.gf needs"):
        export_merge(dirs, "gradient_fusion", {}, tmp_path / "out", merge_key="modular.merges.gf")


def test_third_party_lora_files_merge_as_the_states_they_were_exported_from(sd1, tmp_path):
    """Each concept exported alone in kohya keys (a community file), then merged from those files,
    gives the merge of the concept states: the files are read through diffusers' converters."""
    dirs = write_concepts(tmp_path / "concepts", sd1, count=2)
    files = []
    for directory in dirs:
        export_state(directory, tmp_path / "kohya" / directory.name, formats=("kohya",))
        files.append(tmp_path / "kohya" / directory.name / KOHYA_FILE)
    params = {"weights": [0.7, 0.3]}
    from_states = export_merge(dirs, "weighted_average", params, tmp_path / "states", merge_key="m")
    from_files = export_merge(files, "weighted_average", params, tmp_path / "files", merge_key="m")
    assert from_states["exact"] and from_files["exact"]
    assert from_files["concepts"] == [KOHYA_FILE.removesuffix(".safetensors")] * 2
    expected, base = diffusers_output(sd1["dir"], tmp_path / "states"), base_output(sd1["dir"])
    assert_same_model(diffusers_output(sd1["dir"], tmp_path / "files"), expected, base)
    with pytest.raises(ExportError, match=rf"{files[0]}: modular.merges.gf needs each concept's recorded"):
        export_merge(files, "gradient_fusion", {}, tmp_path / "gf", merge_key="modular.merges.gf")
    partial = tmp_path / "partial.safetensors"  # e.g. a file of another architecture: other layers
    tensors = load_file(str(files[1]))
    dropped = sorted(key for key in tensors if key.endswith(".lora_down.weight"))[0].removesuffix(".lora_down.weight")
    save_file({k: v for k, v in tensors.items() if not k.startswith(dropped + ".")}, str(partial))
    with pytest.raises(ValueError, match=rf"{partial} and {files[0]} adapt different layers"):
        export_merge([files[0], partial], "weighted_average", {}, tmp_path / "other", merge_key="m")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ExportError, match=str(garbage)):
        export_merge([files[0], garbage], "weighted_average", {}, tmp_path / "bad", merge_key="m")


def test_an_svd_rank_beyond_a_layer_and_unknown_formats_are_refused(sd1, tmp_path):
    last = write_chain(tmp_path / "run", sd1, "magmax", tasks=1)
    largest = min(min(shape) for shape in sd1["layers"].values())
    with pytest.raises(ExportError, match=rf"--rank / --energy: SVD rank {largest + 1} is larger than layer .* allows"):
        export_state(last, tmp_path / "out", svd=SvdSettings(rank=largest + 1))
    with pytest.raises(ExportError, match="--format / export.formats: \\['onnx'\\]"):
        export_state(last, tmp_path / "out", formats=("onnx",))
    with pytest.raises(ExportError, match="energy in"):
        SvdSettings(energy=1.5)


def test_the_cli_exports_a_state_and_a_merge_and_names_bad_input(sd1, tmp_path, capsys):
    from lorachain.cli import main

    last = write_chain(tmp_path / "run", sd1, "magmax", tasks=2)
    assert main(["export", str(last), "--rank", "2", "--out", str(tmp_path / "s"), "--format", "diffusers"]) == 0
    printed = capsys.readouterr().out
    assert "relative Frobenius error" in printed and (tmp_path / "s" / ERRORS_FILE).is_file()
    assert not (tmp_path / "s" / KOHYA_FILE).exists()
    dirs = [str(d) for d in write_concepts(tmp_path / "concepts", sd1, count=2)]
    assert main(["export", "--merge", "blocklora", "--concepts", *dirs, "--out", str(tmp_path / "m")]) == 0
    assert {DIFFUSERS_FILE, KOHYA_FILE} <= {p.name for p in (tmp_path / "m").iterdir()}
    assert main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "nowhere/state.json: state manifest missing" in capsys.readouterr().err


def test_the_cli_finds_a_merge_by_config_label_and_refuses_a_k_that_was_not_run(sd1, tmp_path, monkeypatch, capsys):
    import yaml

    from lorachain.cli import main

    monkeypatch.chdir(tmp_path)  # the config's paths are relative to the workflow's directory
    write_concepts(tmp_path / "results" / "objects" / "modular" / "adapters" / "blocks", sd1, count=2)
    config = {
        "domains": {"objects": {}},
        "modular": {"concepts": 2, "merges": {"bl": {"method": "blocklora", "adapters": "blocks", "weights": "mean"}}},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["export", "--config", "config.yaml", "--merge", "bl", "--out", "out", "--format", "diffusers"]) == 0
    record = json.loads((tmp_path / "out" / RECORD_FILE).read_text())
    assert record["method"]["params"] == {"weights": "mean"} and record["rank"]["max"] == 2 * RANK
    assert main(["export", "--config", "config.yaml", "--merge", "bl", "--k", "3", "--out", "x"]) == 2
    assert "--k 3 is not among the merge sizes" in capsys.readouterr().err


@pytest.mark.slow
def test_an_sdxl_export_loads_in_stock_diffusers_in_both_key_formats(tiny_sdxl_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    sdxl = {"dir": tiny_sdxl_dir}
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    sdxl["layers"] = attention_layers(unet)
    last = write_chain(tmp_path / "run", sdxl, "merge_init", tasks=2)
    export_state(last, tmp_path / "out", formats=("diffusers", "kohya"))
    apply_to_unet(unet, fold_state(last, make_method("merge_init")))
    with torch.no_grad():
        expected = unet(**unet_inputs(unet)).sample
    for weight_name in (DIFFUSERS_FILE, KOHYA_FILE):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
        with torch.no_grad():
            base = pipe.unet(**unet_inputs(pipe.unet)).sample
        pipe.load_lora_weights(str(tmp_path / "out"), weight_name=weight_name)
        with torch.no_grad():
            assert_same_model(pipe.unet(**unet_inputs(pipe.unet)).sample, expected, base)


def random_adapters(count: int, seed: int = 0, rank: int = 2, shape=(12, 10), blocks: bool = False):
    generator = torch.Generator().manual_seed(seed)
    adapters = []
    for slot in range(count):
        B = torch.randn(shape[0], rank, generator=generator)
        if blocks:
            B = B * block_mask(shape[0], count, slot)
        adapters.append(LayerAdapter(A=torch.randn(rank, shape[1], generator=generator), B=B, scale=1.5))
    return adapters


def test_every_declared_low_rank_sum_is_what_the_method_computes():
    """A method's declared terms (what an exact export writes) equal its own fold or merge."""
    from lorachain.lora import Concept, linear_combination
    from lorachain.methods import merge_class, merge_names, method_names

    declared = 0
    for name in method_names():
        method = make_method(name)
        adapters = random_adapters(3)
        terms = method.folded_terms(adapters)
        if terms is None:
            continue
        merged = None
        for adapter in adapters:
            merged = method.fold(merged, adapter.delta())
        live = [(1.0, adapters[-1])] if method.adapter_stays_live else []
        expected = merged if merged is not None else torch.zeros(12, 10)
        if live:
            expected = expected + adapters[-1].delta()
        pairs = terms + live
        actual = linear_combination([a for _, a in pairs], [c for c, _ in pairs])
        torch.testing.assert_close(actual, expected, msg=name)
        declared += 1
    for name in merge_names():
        if merge_class(name).needs_layer_inputs:
            continue
        method = make_merge(name)
        concepts = [
            Concept(name=f"c{i}", adapters={"layer": adapter}, slot=i)
            for i, adapter in enumerate(random_adapters(3, blocks=True))
        ]
        weights = method.validate(concepts)
        terms = method.low_rank_terms("layer", concepts, weights)
        if terms is None:
            continue
        actual = linear_combination([a for _, a in terms], [c for c, _ in terms])
        torch.testing.assert_close(actual, method.merge_layer("layer", 0, concepts, weights), msg=name)
        declared += 1
    assert declared >= 8  # 5 continual methods sum their deltas, 3 merges are weighted sums
