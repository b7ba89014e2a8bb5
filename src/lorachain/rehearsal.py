"""A rehearsal of the paper's config on a CPU: ``config/config.yaml`` with only its models, its
dataset roots and its sizes substituted, so the code paths the paper's grid takes (models loaded by
path through ``from_pretrained``, a replacement VAE, real encoder classes, a CSD checkpoint in the
published layout, the real DreamBooth layout, gradient checkpointing, every method, adapter and
merge of the config) run end to end in minutes, with nothing switched to the ``tiny:`` paths.

* :func:`build_stand_ins` writes a local stand-in of the same class for every model the paper
  names, with ``save_pretrained`` (an SDXL, SD3 or FLUX.1 pipeline of the named model's class, a
  replacement VAE, DINO's ``ViTModel``, ``CLIPModel`` with its processor) or ``torch.save``
  (CSD's training ``save_dict``), plus a generated UnlearnCanvas tree. They carry no marker of the
  workflow's tiny builds: to the workflow they are downloads.
* :func:`rehearsal_config` substitutes them into the paper's config; :func:`substituted_keys`
  lists what differs, which the tests hold to :data:`SUBSTITUTABLE`.

``lorachain rehearsal DIR`` does both and prints the Snakemake command.

The transformer models' settings are commented blocks at the end of ``config/config.yaml``
(``# >>> sd3.5-medium`` ... ``# <<< sd3.5-medium``): :func:`config_block` reads one,
:func:`with_block` applies it to the paper config (what a user does by uncommenting it), and
``lorachain rehearsal DIR --block NAME`` rehearses the result on a tiny SD3 or FLUX.1-dev
stand-in written by ``save_pretrained``; :func:`domain_targets` is the part of its DAG that CI runs.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

from lorachain import plan
from lorachain.composition import parse_composition

# The sizes of a rehearsal (everything else is the paper's): one order, one seed, two tasks per
# domain, two modular concepts merged together, a few steps at 64 px, fp32, AdamW (bitsandbytes
# needs a GPU). Every job is mostly imports, so the job count is what costs: 173 jobs.
REHEARSAL_SIZES = {
    "num_tasks": 2,
    "modular_concepts": 2,
    "training": {"rank": 4, "lora_alpha": 4, "steps": 3, "resolution": 64, "mixed_precision": "no"},
    "optimizer": "adamw",
    "sampling": {"num_samples": 1, "steps": 2, "resolution": 64, "precision": "no"},
    "layer_inputs_timesteps": 2,
    "export_svd_rank": 4,  # the paper's rank 64 exceeds the stand-in U-Net's narrowest layers (32)
}
# The transformer stand-ins' narrowest targeted layers are 32 wide (tiny SD3: 4 heads x 8, its
# caption projection 32; tiny FLUX.1: 2 heads x 16): rank 4 and export.svd_rank 4 fit them as for
# the stand-in U-Net, so a block's rehearsal uses the same REHEARSAL_SIZES.
# Every key a rehearsal may change ("*" any name at that level).
SUBSTITUTABLE = {
    "model.pretrained",
    "model.vae",
    "model.revision",
    "domains.*.dataset.root",
    "domains.*.num_tasks",
    "orders",
    "seeds",
    "training.rank",
    "training.lora_alpha",
    "training.steps",
    "training.resolution",
    "training.mixed_precision",
    "training.optimizer.name",
    "sampling.num_samples",
    "sampling.steps",
    "sampling.resolution",
    "sampling.precision",
    "metrics.dino.pretrained",
    "metrics.clip.pretrained",
    "metrics.csd.checkpoint",
    "modular.concepts",
    "modular.merge_sizes",
    "modular.mixes.*.*",
    "modular.layer_inputs.timesteps",
    "compositions.*.groups",
    "export.svd_rank",
}


def config_block(text: str, name: str, source: str = "config/config.yaml") -> dict:
    """The commented block `name` of a config file's `text` (``# >>> name`` ... ``# <<< name``;
    its lines less the leading "# " are YAML, "# # ..." lines comments), as a dict of top-level
    sections. A block that is absent, unterminated or not such YAML is an error naming `source`
    and the marker."""
    from lorachain.config_checks import ConfigError

    lines = text.splitlines()
    start = re.compile(rf"# >>> {re.escape(name)}(:|\s|$)")
    begin = next((index for index, line in enumerate(lines) if start.match(line)), None)
    if begin is None:
        raise ConfigError(f"{source}: no block '# >>> {name}' (the blocks there: {', '.join(block_names(text))})")
    end = next((index for index in range(begin + 1, len(lines)) if lines[index].rstrip() == f"# <<< {name}"), None)
    if end is None:
        raise ConfigError(f"{source}: the block '# >>> {name}' (line {begin + 1}) has no end line '# <<< {name}'")
    yaml_lines = []
    for number, line in enumerate(lines[begin + 1 : end], start=begin + 2):
        if line.startswith("# # ") or line.rstrip() in ("# #", "#", ""):
            continue  # a comment of the block, or a blank line
        if not line.startswith("# "):
            raise ConfigError(f"{source}:{number}: a line of the block '# >>> {name}' must start with '# ': {line!r}")
        yaml_lines.append(line[2:])
    return _block_sections("\n".join(yaml_lines), f"{source}: the block '# >>> {name}'")


def _block_sections(yaml_text: str, where: str) -> dict:
    import yaml

    from lorachain.config_checks import ConfigError

    try:
        block = yaml.safe_load(yaml_text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{where} is not valid YAML once uncommented: {error}") from None
    if not isinstance(block, dict) or not all(isinstance(keys, dict) for keys in block.values()):
        raise ConfigError(f"{where} must hold top-level sections of keys (model:, training:, ...)")
    return block


def block_names(text: str) -> list[str]:
    """The names of a config file's commented blocks, in file order."""
    return re.findall(r"^# >>> ([^\s:]+)", text, flags=re.MULTILINE)


def with_block(paper: dict, block: dict) -> dict:
    """`paper` with a block applied as a user applies it by uncommenting it: each key of each
    section the block names replaces the paper's key of that name whole (a block's
    ``training.optimizer`` or ``modular.adapters`` is the whole optimizer, every adapter). A block
    that names ``model.pretrained`` names another model: the paper's ``model.vae`` and
    ``model.revision`` belong to the paper's model and are dropped (SD3/FLUX ship their own VAE)."""
    config = copy.deepcopy(paper)
    for section, keys in block.items():
        config.setdefault(section, {}).update(copy.deepcopy(keys))
    if "pretrained" in block.get("model", {}):
        for key in ("vae", "revision"):
            if key not in block["model"]:
                config["model"].pop(key, None)
    return config


# The stand-in's tiny architecture (lorachain.models.tiny) by a hub id's name, most specific first.
_STAND_INS = (("flux.1-schnell", "flux_schnell"), ("flux", "flux"), ("stable-diffusion-3", "sd3"), ("xl", "sdxl"))


def stand_in_architecture(hub_id: str) -> str:
    """The tiny architecture standing in for the pipeline `hub_id` names (SDXL, SD3/3.5 or
    FLUX.1 dev/schnell); another is an error naming the key."""
    name = hub_id.lower()
    for part, architecture in _STAND_INS:
        if part in name:
            return architecture
    raise ValueError(
        f"model.pretrained {hub_id!r}: the rehearsal has stand-ins for SDXL, SD3/3.5 and FLUX.1 pipelines only"
    )


def _stand_in_name(hub_id: str) -> str:
    return hub_id.replace("/", "--")


def build_stand_ins(directory: str | Path, paper: dict, seed: int = 0) -> dict[str, Path]:
    """Write a stand-in for every model `paper` names (by the key that names it) and a generated
    UnlearnCanvas tree; returns key -> path. A model of a kind not known here is an error, so a
    change of the paper config cannot slip past the rehearsal."""
    from lorachain.data.synthetic import generate_unlearncanvas_like
    from lorachain.metrics.encoders import save_tiny_encoder
    from lorachain.models.tiny import build_tiny_pipeline, build_tiny_vae

    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    model, metrics = paper["model"], paper.get("metrics", {})
    paths: dict[str, Path] = {}
    if "pretrained" in model:
        architecture = stand_in_architecture(model["pretrained"])
        paths["model.pretrained"] = directory / _stand_in_name(model["pretrained"])
        build_tiny_pipeline(architecture, seed=seed).save_pretrained(paths["model.pretrained"], safe_serialization=True)
    if model.get("vae"):
        paths["model.vae"] = directory / _stand_in_name(model["vae"])
        build_tiny_vae(seed=seed + 1).save_pretrained(paths["model.vae"], safe_serialization=True)
    for name, key in (("dino", "pretrained"), ("clip", "pretrained"), ("csd", "checkpoint")):
        source = (metrics.get(name) or {}).get(key)
        if source is None:
            continue
        folder = directory / (_stand_in_name(source) if key == "pretrained" else name)
        paths[f"metrics.{name}.{key}"] = save_tiny_encoder(name, folder, seed=seed)
    paths["unlearncanvas"] = generate_unlearncanvas_like(directory / "unlearncanvas", size=64, seed=seed)
    return paths


def rehearsal_config(paper: dict, stand_ins: dict[str, Path], dreambooth_root: str | Path) -> dict:
    """`paper` with its models, dataset roots and sizes substituted (see the module docstring)."""
    config = copy.deepcopy(paper)
    for key, path in stand_ins.items():
        if "." in key:
            *parents, last = key.split(".")
            block = config
            for part in parents:
                block = block[part]
            block[last] = str(path)
    if "model.pretrained" in stand_ins:
        config["model"].pop("revision", None)  # the stand-in is a local directory: no hub revision
    roots = {"dreambooth": str(Path(dreambooth_root).absolute()), "unlearncanvas": str(stand_ins["unlearncanvas"])}
    for block in config["domains"].values():
        block["dataset"]["root"] = roots[block["dataset"]["layout"]]
        block["num_tasks"] = REHEARSAL_SIZES["num_tasks"]
    config["orders"], config["seeds"] = config["orders"][:1], config["seeds"][:1]
    config["training"].update(REHEARSAL_SIZES["training"])
    config["training"].setdefault("optimizer", {})["name"] = REHEARSAL_SIZES["optimizer"]
    config.setdefault("sampling", {}).update(REHEARSAL_SIZES["sampling"])
    if config.get("modular"):
        concepts = REHEARSAL_SIZES["modular_concepts"]
        config["modular"]["concepts"] = concepts
        config["modular"]["merge_sizes"] = [concepts]  # the paper's sizes stop at its concept count
        for counts in config["modular"].get("mixes", {}).values():  # one concept of each kind
            counts.update(dict.fromkeys(counts, 1))
        config["modular"].setdefault("layer_inputs", {})["timesteps"] = REHEARSAL_SIZES["layer_inputs_timesteps"]
    for block in (config.get("compositions") or {}).values():
        block["groups"] = _rehearsal_groups(paper, config, block)
    if (config.get("export") or {}).get("svd_rank") is not None:
        config["export"]["svd_rank"] = REHEARSAL_SIZES["export_svd_rank"]
    return config


def domain_targets(config: dict, domain: str) -> list[str]:
    """The Snakemake targets of one domain's results in both regimes (its tables, figures and
    grid; its modular table, ablation, compositions and diagnostics): every rule of the full DAG
    but the mixed set's preparation and the provenance table (which needs every job), at half its
    jobs. What a block's rehearsal runs in CI (the other domain and the mixed set add jobs of the
    same rules)."""
    return plan.domain_outputs(config, domain) + plan.modular_outputs(config, domain)


def _members(config: dict, name: str) -> list[tuple[str, int]]:
    """(domain, rank within that domain) of each position of a set: a modular set's, or the
    continual domain's own tasks."""
    if name in plan.modular_mixes(config):
        members = plan.set_members(config, name)
        return [(domain, members[: index + 1].count(domain)) for index, domain in enumerate(members)]
    size = config["domains"][name]["num_tasks"]
    if name in plan.modular_domains(config):
        size = min(size, plan.set_size(config, name))
    return [(name, rank) for rank in range(1, size + 1)]


def _rehearsal_groups(paper: dict, config: dict, block: dict) -> list[list[int]]:
    """A composition's groups moved into the rehearsal's smaller set: each member keeps its domain
    and its rank there; a group with a member the rehearsal does not train is left out. None left:
    the first positions of the set, one per member."""
    composition = parse_composition("rehearsal", block)
    before, after = _members(paper, composition.set), _members(config, composition.set)
    moved = [
        [after.index(before[position - 1]) + 1 for position in group]
        for group in composition.groups
        if all(before[position - 1] in after for position in group)
    ]
    return moved or [list(range(1, len(composition.placeholders) + 1))]


def substituted_keys(paper, rehearsal, path: str = "") -> set[str]:
    """The dotted keys at which `rehearsal` differs from `paper` (added, removed or changed)."""
    if isinstance(paper, dict) and isinstance(rehearsal, dict):
        keys = set(paper) | set(rehearsal)
        return {
            found
            for key in keys
            for found in substituted_keys(paper.get(key), rehearsal.get(key), f"{path}.{key}" if path else key)
        }
    return set() if paper == rehearsal else {path}


def allowed(key: str) -> bool:
    parts = key.split(".")
    return any(
        len(pattern.split(".")) == len(parts) and all(p in ("*", k) for p, k in zip(pattern.split("."), parts))
        for pattern in SUBSTITUTABLE
    )
