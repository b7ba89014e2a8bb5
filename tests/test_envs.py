"""The conda environment for cluster jobs pins exactly what the package pins."""

from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    for separator in ("==", ">=", "<=", "~=", "<", ">"):
        requirement = requirement.split(separator)[0]
    return requirement.strip().lower().replace("_", "-")


def test_conda_env_pins_match_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    package = project["dependencies"] + project["optional-dependencies"]["cuda"]
    env = yaml.safe_load((ROOT / "envs" / "lorachain.yaml").read_text())
    pip_section = next(item["pip"] for item in env["dependencies"] if isinstance(item, dict))
    assert {_name(r): r.replace(" ", "") for r in package} == {_name(r): r.replace(" ", "") for r in pip_section}


def test_constraints_pin_torch_and_torchvision_like_the_package():
    package = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    constraints = [
        line.strip()
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for pin in constraints:
        assert pin in package, f"constraints.txt pins {pin} but pyproject.toml does not"
    assert {"torch==2.13.0", "torchvision==0.28.0"} <= set(constraints)
