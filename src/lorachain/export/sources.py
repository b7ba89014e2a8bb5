"""What can be exported: a continual state (a task directory and its chain) or a modular merge
(k concept states and a merge method), each read into one :class:`ExportSource`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lorachain.export.factors import ExportError
from lorachain.lora import LayerAdapter
from lorachain.paths import GRAMS_FILE, STATE_FILE
from lorachain.torch_env import torch

Terms = dict[str, list[tuple[float, LayerAdapter]]]


@dataclass
class ExportSource:
    """A model to export: its description, and its layers as low-rank terms (`terms`, where the
    method declares them) or as dense deltas (`dense()`, always: the fused U-Net needs them)."""

    kind: str  # "continual state" or "modular merge"
    location: str  # the task directory, or the merge's label and concept directories
    base_model: str
    architecture: str
    method: dict  # {"name", "params"}
    items: list[dict]  # per task / concept: concept, train_prompt, token, directory
    terms: Terms | None
    dense: Callable[[], dict[str, torch.Tensor]]
    embeddings: list[tuple[Path, str]] = field(default_factory=list)  # (embeddings file, token)


def _item(directory: Path, manifest: dict) -> dict:
    record = manifest.get("embeddings") or {}
    return {
        "concept": manifest.get("concept"),
        "train_prompt": manifest.get("train_prompt"),
        "token": record.get("token"),
        "directory": str(directory),
    }


def _embeddings(chain: list[tuple[Path, dict]]) -> list[tuple[Path, str]]:
    from lorachain.state import EMBEDDINGS_FILE

    return [
        (Path(directory) / EMBEDDINGS_FILE, manifest["embeddings"]["token"])
        for directory, manifest in chain
        if manifest.get("embeddings")
    ]


def state_source(task_dir: str | Path) -> ExportSource:
    """The continual state ending at `task_dir` (checked: complete manifests and LoRA files of the
    whole chain). Exact where the method's fold declares its terms (plus the live adapter)."""
    from lorachain.methods import make_method
    from lorachain.state import fold_state, load_adapters, read_chain

    chain = read_chain(task_dir)  # StateError (names the file) for an unfinished or foreign chain
    last = chain[-1][1]
    method = make_method(last["method"]["name"], last["method"]["params"], key=f"{Path(task_dir) / STATE_FILE}: method")
    adapters = [load_adapters(directory, manifest) for directory, manifest in chain]
    terms: Terms | None = {}
    for layer in sorted(set().union(*adapters)):
        folded = method.folded_terms([task[layer] for task in adapters if layer in task])
        if folded is None:
            terms = None
            break
        live = [(1.0, adapters[-1][layer])] if method.adapter_stays_live and layer in adapters[-1] else []
        terms[layer] = folded + live

    def dense() -> dict[str, torch.Tensor]:
        state = fold_state(task_dir, method)
        return {layer: state.layer_delta(layer) for layer in state.layers()}

    return ExportSource(
        kind="continual state",
        location=str(task_dir),
        base_model=last["base_model"],
        architecture=last["architecture"],
        method=dict(last["method"]),
        items=[_item(directory, manifest) for directory, manifest in chain],
        terms=terms,
        dense=dense,
        embeddings=_embeddings(chain),
    )


def _check_concept_dirs(concept_dirs: list, merge_key: str, gram_name: str | None) -> list[Path | None]:
    """Every concept's state (and gram file, where the merge needs one) exists: else the merge was
    not run. Returns the gram files (None each where none is needed). A LoRA file in place of a
    state directory is a third-party concept (:func:`_file_concept`), with no recorded inputs."""
    grams = []
    for position, directory in enumerate(concept_dirs, start=1):
        if Path(directory).is_file():
            if gram_name is not None:
                raise ExportError(
                    f"{directory}: {merge_key} needs each concept's recorded layer inputs, which a LoRA file "
                    "does not have; merge it with a method that needs none (e.g. weighted_average, ties, dare)"
                )
            grams.append(None)
            continue
        manifest = Path(directory) / STATE_FILE
        if not manifest.is_file():
            raise ExportError(
                f"{manifest}: concept {position} of {merge_key} (k={len(concept_dirs)}) has no finished state, "
                "so this merge was not run; train the concepts first (snakemake with the merge's outputs, or "
                "`snakemake export`)"
            )
        gram = None if gram_name is None else Path(directory) / gram_name
        if gram is not None and not gram.is_file():
            raise ExportError(
                f"{gram}: {merge_key} needs the recorded layer inputs of concept {position}, which were not "
                "recorded; run the merge in the workflow first (rule record_layer_inputs)"
            )
        grams.append(gram)
    return grams


def _file_concept(path: Path, slot: int):
    """A LoRA file (lorachain's, diffusers', peft's or kohya/A1111's: :func:`lorachain.lora.read_lora`
    normalises it with diffusers' converters) as a merge concept in `slot`, with what stands for its
    manifest: no base model (``--base-model`` names it), its file name as the concept."""
    from lorachain.lora import LoraFileError, read_lora

    try:
        lora = read_lora(path)
    except LoraFileError as error:
        raise ExportError(str(error)) from None
    return lora.to_concept(str(path), slot=slot), {"concept": path.stem, "train_prompt": None}


def merge_source(concept_dirs: list, merge_name: str, merge_params: dict, merge_key: str) -> ExportSource:
    """The merge `merge_name` (its config key `merge_key`, for messages) of the concepts in
    `concept_dirs`: concept state directories, or LoRA files (third-party ones included) in their
    place. Exact where the merge declares its low-rank terms."""
    from lorachain.methods import make_merge
    from lorachain.modular import load_concept

    if not concept_dirs:
        raise ExportError(f"{merge_key}: no concept states to merge (give at least one)")
    method = make_merge(merge_name, merge_params, key=merge_key)
    recording = type(method).layer_input_recording(method.params)
    gram_name = None if recording is None else GRAMS_FILE.format(recording=recording)
    grams = _check_concept_dirs(list(concept_dirs), merge_key, gram_name)
    loaded = [
        _file_concept(Path(directory), slot) if Path(directory).is_file() else load_concept(directory, with_grams=gram)
        for slot, (directory, gram) in enumerate(zip(concept_dirs, grams))
    ]
    states = [(concept, manifest) for concept, manifest in loaded if manifest.get("base_model")]
    first = states[0][1] if states else {"base_model": "(not recorded in LoRA files: --base-model)", "architecture": ""}
    for concept, manifest in states[1:]:
        if (manifest.get("base_model"), manifest.get("architecture")) != (first["base_model"], first["architecture"]):
            raise ExportError(
                f"{Path(concept.name) / STATE_FILE}: trained on {manifest.get('base_model')!r}, but "
                f"{Path(states[0][0].name) / STATE_FILE} on {first['base_model']!r}; merge concepts of one base model"
            )
    concepts = [concept for concept, _ in loaded]
    weights = method.validate(concepts)
    method.prepare(concepts, weights)
    terms: Terms | None = {}
    for layer in sorted(concepts[0].adapters):
        found = method.low_rank_terms(layer, concepts, weights)
        if found is None:
            terms = None
            break
        terms[layer] = found
    return ExportSource(
        kind="modular merge",
        location=f"{merge_key} of {len(concepts)} concept(s)",
        base_model=first["base_model"],
        architecture=first["architecture"],
        method={"name": merge_name, "params": method.params},
        items=[_item(Path(concept.name), manifest) for concept, manifest in loaded],
        terms=terms,
        dense=lambda: method.merge(concepts),
        embeddings=_embeddings([(Path(concept.name), manifest) for concept, manifest in loaded]),
    )
