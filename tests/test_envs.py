"""pyproject.toml declares compatible ranges, constraints.txt the exact tested set, envs/lorachain.yaml
the same pins as constraints.txt; these tests keep the three consistent."""

import os
import shutil
import site
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
# Declared in pyproject.toml but not installed on the CPU test machine.
NOT_INSTALLED_HERE = {"bitsandbytes", "wandb"}


def _declared() -> dict[str, Requirement]:
    """Every dependency and every extra's requirement, by canonical name."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {canonicalize_name(r.name): r for r in map(Requirement, lines)}


def _pinned(lines: list[str]) -> dict[str, str]:
    """name -> version of `name==version` lines; anything else is an error."""
    pins = {}
    for line in lines:
        requirement = Requirement(line)
        specifiers = list(requirement.specifier)
        assert len(specifiers) == 1 and specifiers[0].operator == "==", f"{line!r} is not an exact pin"
        pins[canonicalize_name(requirement.name)] = specifiers[0].version
    return pins


def _constraints() -> dict[str, str]:
    text = (ROOT / "constraints.txt").read_text()
    return _pinned([line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")])


def _env_pins() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "envs" / "lorachain.yaml").read_text())
    return _pinned(next(item["pip"] for item in env["dependencies"] if isinstance(item, dict)))


def test_every_dependency_has_a_pin_and_every_pin_a_dependency():
    assert set(_declared()) == set(_constraints())


def test_every_pin_satisfies_its_range():
    declared = _declared()
    for name, version in _constraints().items():
        assert declared[name].specifier.contains(version, prereleases=True), (
            f"constraints.txt pins {name}=={version} outside pyproject.toml's {declared[name]}"
        )


def test_ranges_are_ranges_except_the_formatters():
    """Only the formatters stay exact in pyproject.toml (a format check must give one verdict)."""
    exact = {name for name, r in _declared().items() if any(s.operator == "==" for s in r.specifier)}
    assert exact == {"ruff", "snakefmt", "black"}


def test_conda_env_pins_equal_the_constraints():
    assert _env_pins() == _constraints()


def test_torch_and_torchvision_are_pinned():
    """An unpinned resolve drags in a multi-GB CUDA build of torch."""
    assert {"torch", "torchvision"} <= set(_constraints())


def test_constraints_are_the_installed_versions():
    """The pins are the versions the test suite runs with (a local label such as +cpu aside)."""
    for name, version in _constraints().items():
        if name in NOT_INSTALLED_HERE:
            continue
        installed = metadata.version(name).split("+")[0]
        assert installed == version, f"constraints.txt pins {name}=={version}, the venv has {installed}"


def _build_wheel(tmp_path: Path) -> Path:
    """The wheel of a copy of the project (building in the shared tree would leave build/ there)."""
    source = tmp_path / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "wheel"]
    subprocess.run([*pip, source], check=True, capture_output=True)
    return next((tmp_path / "wheel").glob("lorachain-*.whl"))


def _venv_over_this_one(tmp_path: Path) -> Path:
    """A throw-away venv that sees this venv's packages (read-only: pip runs there with --dry-run)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    # a venv made from a venv sees the base interpreter's packages, not this venv's: add them by a .pth
    (next((venv / "lib").glob("python*/site-packages")) / "outer.pth").write_text(site.getsitepackages()[0] + "\n")
    return venv / "bin" / "python"


@pytest.mark.slow
def test_installs_into_an_environment_that_has_the_dependencies(tmp_path):
    """pip would install lorachain alone into an environment that has its dependencies: no upgrade, no
    downgrade (a real resolve of the built wheel's ranges; PyPI is asked only if a range is unmet)."""
    wheel = _build_wheel(tmp_path)
    python = _venv_over_this_one(tmp_path)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    command = [python, "-m", "pip", "install", "--dry-run", wheel]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    would_install = [line for line in result.stdout.splitlines() if line.startswith("Would install")]
    assert would_install == ["Would install lorachain-0.1.0"], result.stdout
