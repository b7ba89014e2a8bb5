"""What the workflow computes from a config, as plain functions of dicts (no Snakemake)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from lorachain import paths, plan
from lorachain.config_checks import ConfigError, check_config, domain_problems, modular_problems

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def demo() -> dict:
    return yaml.safe_load((ROOT / "config" / "tiny.yaml").read_text())


def test_canonical_sorts_every_dict_and_keeps_list_order():
    value = {"b": [{"z": 1, "a": 2}, 3], "a": {"y": 0, "x": 1}}
    assert repr(plan.canonical(value)) == repr({"a": {"x": 1, "y": 0}, "b": [{"a": 2, "z": 1}, 3]})


def test_selection_block_is_made_for_the_pool_and_ignores_other_keys(demo):
    block = demo["domains"]["objects"]
    block.update(num_tasks=2, task_pool=3, metrics=["dino"])
    selection = plan.selection_block(demo, "objects")
    assert selection["num_tasks"] == 3 and "metrics" not in selection and "task_pool" not in selection


def test_chain_files_name_the_state_and_lora_of_each_earlier_task():
    run = {"domain": "objects", "method": "naive", "order": 0, "seed": 1}
    files = plan.chain_files(run, 2)
    assert files == [
        f"results/objects/naive/order0-seed1/task01/{paths.STATE_FILE}",
        f"results/objects/naive/order0-seed1/task01/{paths.LORA_FILE}",
        f"results/objects/naive/order0-seed1/task02/{paths.STATE_FILE}",
        f"results/objects/naive/order0-seed1/task02/{paths.LORA_FILE}",
    ]
    assert plan.chain_files(run, 0) == []


def test_all_outputs_cover_every_domain_metric_and_the_modular_regime(demo):
    outputs = plan.all_outputs(demo)
    for name in demo["domains"]:
        for metric in plan.domain_metrics(demo, name):
            assert f"results/figures/{name}/heatmap-{metric}.pdf" in outputs
        assert f"results/tables/{name}.md" in outputs
    for name in plan.modular_domains(demo):
        assert f"results/tables/{name}-modular.csv" in outputs
    without = copy.deepcopy(demo)
    without.pop("modular")
    assert not any("modular" in path for path in plan.all_outputs(without))


def test_modular_domains_follow_the_list_when_given(demo):
    demo["modular"]["domains"] = [list(demo["domains"])[-1]]
    assert plan.modular_domains(demo) == demo["modular"]["domains"]


def test_cross_block_problems_name_the_key_and_the_fix(demo):
    assert domain_problems(demo) == [] and modular_problems(demo) == []
    demo["domains"]["objects"].update(num_tasks=5, task_pool=4)
    (problem,) = domain_problems(demo)
    assert "domains.objects.task_pool: 4 is smaller than num_tasks 5" in problem
    demo["modular"].update(domains=["objects", "nope"], merge_sizes=[99])
    demo["modular"]["merges"][next(iter(demo["modular"]["merges"]))]["adapters"] = "missing"
    problems = "\n".join(modular_problems(demo))
    assert "modular.domains: 'nope' is not a domain" in problems
    assert "modular.merge_sizes: k = 99 exceeds" in problems
    assert "'missing' is not a label under modular.adapters" in problems
    with pytest.raises(ConfigError, match="task_pool"):
        check_config(demo)


def test_the_schemas_enums_are_the_librarys_names():
    """Names the schema lists by hand (it cannot import them) stay those the library knows."""
    from lorachain.data.domains import LAYOUTS
    from lorachain.metrics.catalog import ALL_METRICS
    from lorachain.models.tiny import TINY_ARCHITECTURES

    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    domain = schema["properties"]["domains"]["additionalProperties"]["properties"]
    assert domain["dataset"]["properties"]["layout"]["enum"] == list(LAYOUTS)
    assert domain["metrics"]["items"]["enum"] == list(ALL_METRICS)
    assert schema["properties"]["model"]["properties"]["tiny"]["enum"] == list(TINY_ARCHITECTURES)
