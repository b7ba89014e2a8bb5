"""The registries as the workflow uses them: the config schema's method and merge blocks generated
from the classes' parameter declarations, config blocks checked by building them, and plugins that
add a method and a merge from outside lorachain."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from lorachain.config_checks import (
    ConfigError,
    check_registered_blocks,
    full_schema,
    registered_block_problems,
    validate_config,
)
from lorachain.methods import (
    COMMON_PARAMS,
    Concept,
    LayerAdapter,
    MethodError,
    PluginError,
    load_plugins,
    make_merge,
    make_method,
    merge_base,
    merge_class,
    merge_names,
    method_class,
    method_names,
    schema_defs,
)
from lorachain.methods import base as method_base
from lorachain.methods.registry import plugin_module_name
from lorachain.params import Param
from lorachain.torch_env import torch

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"


def then_blocks(block: dict) -> dict[str, dict]:
    """method name -> the properties its if/then allows."""
    return {rule["if"]["properties"]["method"]["const"]: rule["then"] for rule in block["allOf"]}


def small_config(**overrides) -> dict:
    config = {
        "model": {"tiny": "sd1"},
        "domains": {"objects": {"dataset": {"layout": "dreambooth", "synthetic": {}}, "num_tasks": 3}},
        "methods": {"naive": {"method": "naive"}},
        "training": {},
    }
    config.update(overrides)
    return config


# ------------------------------------------------------------------------------ generated schema


def test_schema_lists_exactly_the_registered_methods_with_their_defaults():
    block = schema_defs()["method_block"]
    assert block["properties"]["method"]["enum"] == method_names()
    rules = then_blocks(block)
    assert sorted(rules) == method_names()
    for name, then in rules.items():
        assert then["additionalProperties"] is False
        properties = {key: value for key, value in then["properties"].items() if key != "method"}
        common = {param.name for param in COMMON_PARAMS}
        assert common <= set(properties), name  # every method accepts the common parameters ...
        assert not any("default" in properties[key] for key in common), name  # ... off unless given
        own = {key: value for key, value in properties.items() if key not in common}
        assert {key: value["default"] for key, value in own.items()} == method_class(name).parameters(), name


def test_schema_lists_exactly_the_registered_merges_and_their_parameters():
    defs = schema_defs()
    block = defs["merge_block"]
    assert sorted(block["properties"]["method"]["enum"]) == merge_names()
    for name, then in then_blocks(block).items():
        allowed = set(then["properties"]) - {"method", "adapters"}
        assert allowed == set(merge_class(name).parameters()), name
        assert then["properties"]["weights"]["$ref"] == "#/$defs/merge_weights"
        assert all("default" not in value for value in then["properties"].values()), (
            "merge defaults stay in the classes"
        )
    assert [option.get("const", option.get("type")) for option in defs["merge_weights"]["oneOf"]] == [
        "mean",
        "number",
        "array",
    ]


def test_the_yaml_schema_holds_no_hand_written_blocks_and_the_full_schema_has_them():
    document = yaml.safe_load(SCHEMA.read_text())
    assert "$defs" not in document
    assert set(full_schema(SCHEMA)["$defs"]) == {"method_block", "merge_block", "merge_weights"}


def test_the_values_of_today_stay_the_defaults():
    assert make_method("blocklora").params == {"num_blocks": 16, "erasure": 0.25, "blockwise": True}
    assert make_method("orthogonal_adaptation").params == {"basis_seed": 0, "columns": "auto"}
    assert make_method("magmax").params == {}


def test_validate_config_fills_method_defaults_and_names_bad_values():
    config = small_config(methods={"b": {"method": "blocklora", "num_blocks": 4}, "o": {"method": "ortho_init"}})
    validate_config(config, SCHEMA)
    assert config["methods"] == {
        "b": {"method": "blocklora", "num_blocks": 4, "erasure": 0.25, "blockwise": True},
        "o": {"method": "ortho_init", "variant": "columnwise", "init_scale": "gaussian"},
    }
    assert config["plugins"] == []
    for block in ({"method": "blocklora", "erasure": 1.0}, {"method": "naive", "rank": 2}, {"method": "ewc"}):
        with pytest.raises(Exception, match=r"methods") as info:
            validate_config(small_config(methods={"bad": block}), SCHEMA)
        assert "bad" in str(info.value)


def test_building_a_method_checks_each_parameter_by_its_declaration():
    with pytest.raises(
        MethodError,
        match=(
            r"methods\.b: method 'blocklora': parameter 'erasure' .* "
            r"must be a number >= 0 and < 1 or a list .*, got 1\.0"
        ),
    ):
        make_method("blocklora", {"erasure": 1.0}, key="methods.b")
    with pytest.raises(MethodError, match=r"parameter 'num_blocks' .* must be an integer >= 1, got 2\.0"):
        make_method("blocklora", {"num_blocks": 2.0})  # stricter than JSON Schema: 2.0 is no integer here
    with pytest.raises(MethodError, match=r"parameter 'blockwise' .* must be a boolean, got 'yes'"):
        make_method("blocklora", {"blockwise": "yes"})


# ------------------------------------------------------------------------------ registry checks


def test_blocklora_num_blocks_is_checked_against_the_longest_chain_and_the_concepts():
    config = small_config(
        domains={
            "objects": {"dataset": {"layout": "dreambooth", "synthetic": {}}, "num_tasks": 3},
            "styles": {"dataset": {"layout": "unlearncanvas", "synthetic": {}}, "num_tasks": 5},
        },
        methods={
            "blocks": {"method": "blocklora", "num_blocks": 4},
            "flat": {"method": "blocklora", "num_blocks": 2, "blockwise": False},
        },
        modular={
            "concepts": 6,
            "adapters": {"bl": {"method": "blocklora", "num_blocks": 5}},
            "merges": {"m": {"method": "ties", "adapters": "bl", "density": 2}},
        },
    )
    problems = registered_block_problems(config)
    assert problems == [
        "config key methods.blocks: method 'blocklora': 5 concepts need 5 row blocks but num_blocks is 4; "
        "raise methods.blocks.num_blocks to at least 5 (each concept owns one block of rows)",
        "config key modular.adapters.bl: method 'blocklora': 6 concepts need 6 row blocks but num_blocks is 5; "
        "raise modular.adapters.bl.num_blocks to at least 6 (each concept owns one block of rows)",
        "config key modular.merges.m: merge 'ties': parameter 'density' (fraction of each delta's entries kept) "
        "must be a number > 0 and <= 1, got 2",
    ]
    with pytest.raises(ConfigError, match=r"config key methods\.blocks"):
        check_registered_blocks(config)
    check_registered_blocks(small_config(methods={"blocks": {"method": "blocklora", "num_blocks": 3}}))


def test_unknown_methods_and_parameters_are_named_by_their_key():
    config = small_config(methods={"x": {"method": "ewc"}, "y": {"method": "naive", "alpha": 1}})
    assert registered_block_problems(config) == [
        "config key methods.x: unknown method 'ewc'; known methods: " + ", ".join(method_names()),
        "config key methods.y: method 'naive' has no parameter(s) ['alpha']; it accepts ['embeddings']",
    ]


# ------------------------------------------------------------------------------ plugins

METHOD_PLUGIN = '''
from lorachain.methods import ContinualMethod, register_method
from lorachain.params import Param


@register_method
class Damped(ContinualMethod):
    """Merge & init, each delta scaled by `factor` before it is added."""

    name = "damped_plugin"
    param_specs = (
        Param("factor", 0.5, {"type": "number", "exclusiveMinimum": 0, "maximum": 1}, "share of each delta kept"),
    )

    def fold(self, merged, delta):
        delta = self.params["factor"] * delta
        return delta if merged is None else merged + delta
'''

MERGE_PLUGIN = """
from lorachain.methods import MergeMethod, linear_combination, register_merge, weights_param
from lorachain.params import Param


@register_merge
class GainedSum(MergeMethod):
    name = "gained_sum_plugin"
    param_specs = (weights_param(1.0), Param("gain", 2, {"type": "integer", "minimum": 1}, "multiplier of the sum"))

    def merge_layer(self, layer, index, concepts, weights):
        return self.params["gain"] * linear_combination([concept.adapters[layer] for concept in concepts], weights)
"""


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """A method plugin given by path and a merge plugin given by module name; the registries are
    restored afterwards so other tests see only the built-in methods."""
    (tmp_path / "damped.py").write_text(textwrap.dedent(METHOD_PLUGIN))
    (tmp_path / "gained_sum_merge.py").write_text(textwrap.dedent(MERGE_PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(method_base, "_REGISTRY", dict(method_base._REGISTRY))
    monkeypatch.setattr(merge_base, "_REGISTRY", dict(merge_base._REGISTRY))
    yield [str(tmp_path / "damped.py"), "gained_sum_merge"]
    for name in ("gained_sum_merge", plugin_module_name((tmp_path / "damped.py").resolve())):
        sys.modules.pop(name, None)


def test_plugins_join_the_registries_the_schema_and_the_checks(plugins, tmp_path):
    modules = load_plugins(plugins)
    assert load_plugins(plugins) == modules  # loading again imports nothing twice
    assert "damped_plugin" in method_names() and "gained_sum_plugin" in merge_names()

    defs = schema_defs()
    assert then_blocks(defs["method_block"])["damped_plugin"]["properties"]["factor"] == {
        "type": "number",
        "exclusiveMinimum": 0,
        "maximum": 1,
        "default": 0.5,
        "description": "share of each delta kept",
    }
    gain = then_blocks(defs["merge_block"])["gained_sum_plugin"]["properties"]["gain"]
    assert gain["type"] == "integer" and gain["minimum"] == 1 and "default 2" in gain["description"]

    config = small_config(
        plugins=plugins,
        methods={"d": {"method": "damped_plugin"}},
        modular={
            "concepts": 2,
            "adapters": {"d": {"method": "damped_plugin", "factor": 0.25}},
            "merges": {"g": {"method": "gained_sum_plugin", "adapters": "d", "gain": 3}},
        },
    )
    validate_config(config, SCHEMA)
    assert config["methods"]["d"] == {"method": "damped_plugin", "factor": 0.5}
    check_registered_blocks(config)

    with pytest.raises(Exception, match="factor"):
        validate_config(small_config(plugins=plugins, methods={"d": {"method": "damped_plugin", "factor": 2}}), SCHEMA)
    with pytest.raises(
        ConfigError, match=r"config key methods\.d: method 'damped_plugin': parameter 'factor' .* got 2"
    ):
        check_registered_blocks(small_config(methods={"d": {"method": "damped_plugin", "factor": 2}}))
    bad_merge = small_config(
        modular={
            "concepts": 1,
            "adapters": {"a": {"method": "naive"}},
            "merges": {"g": {"method": "gained_sum_plugin", "adapters": "a", "gain": 0}},
        }
    )
    with pytest.raises(
        ConfigError, match=r"config key modular\.merges\.g: merge 'gained_sum_plugin': parameter 'gain'"
    ):
        check_registered_blocks(bad_merge)

    method = make_method("damped_plugin", {"factor": 0.25})
    assert torch.equal(method.fold(None, torch.ones(2, 2)), torch.full((2, 2), 0.25))
    adapters = {"x": LayerAdapter(A=torch.ones(1, 3), B=torch.ones(2, 1), scale=1.0)}
    merged = make_merge("gained_sum_plugin", {"gain": 3}).merge([Concept("a", adapters), Concept("b", adapters)])
    assert torch.equal(merged["x"], torch.full((2, 3), 6.0))


def test_a_plugin_that_cannot_be_imported_is_named_by_its_key(tmp_path):
    with pytest.raises(PluginError, match=r"config key plugins\[0\]: 'nowhere\.py' is not a file"):
        load_plugins(["nowhere.py"])
    with pytest.raises(PluginError, match=r"config key plugins\[1\]: cannot import module 'no_such_plugin_module'"):
        load_plugins(["json", "no_such_plugin_module"])
    (tmp_path / "broken.py").write_text("raise RuntimeError('broken on purpose')\n")
    with pytest.raises(
        ConfigError, match=r"plugins\[0\]: importing .*broken\.py failed \(RuntimeError: broken on purpose\)"
    ):
        validate_config(small_config(plugins=[str(tmp_path / "broken.py")]), SCHEMA)


def test_param_declarations_describe_themselves():
    param = Param("p", 1, {"type": ["integer", "null"], "minimum": 0}, "a count")
    assert param.fragment() == {"type": ["integer", "null"], "minimum": 0, "default": 1, "description": "a count"}
    assert param.problem(None) is None and param.problem(3) is None
    assert param.problem(-1) == "parameter 'p' (a count) must be an integer or null >= 0, got -1"
