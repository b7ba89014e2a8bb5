"""Taking a model out of lorachain: any continual state or modular merge as a diffusers LoRA file,
the same in kohya keys (ComfyUI, AUTOMATIC1111) and a fused U-Net, with metadata, a model card and
the concept embeddings beside them (docs/export.md).

* :mod:`~lorachain.export.sources` reads what is exported (a task directory and its chain, or k
  concept states and a merge) into an :class:`ExportSource`;
* :mod:`~lorachain.export.factors` turns it into per-layer factors: exactly, by concatenating the
  low-rank terms a method declares, or by a truncated SVD with its error;
* :mod:`~lorachain.export.writers` and :mod:`~lorachain.export.card` write the files.

Entry points: :func:`export_state`, :func:`export_merge` (the CLI's), and the workflow jobs'
:func:`export_state_job`, :func:`export_merge_job`. This package sits above state, methods and
modular; nothing in the library imports it.
"""

from __future__ import annotations

from pathlib import Path

from lorachain.export.card import write_card
from lorachain.export.factors import (
    ExportedLayer,
    ExportError,
    SvdSettings,
    concatenated,
    overall_error,
    svd_factors,
)
from lorachain.export.sources import ExportSource, merge_source, state_source
from lorachain.export.writers import (
    DIFFUSERS_FILE,
    ERRORS_FILE,
    FORMATS,
    KOHYA_FILE,
    RECORD_FILE,
    UNET_DIR,
    copy_embeddings,
    default_formats,
    file_metadata,
    format_problems,
    write_denoiser,
    write_diffusers,
    write_errors,
    write_kohya,
    write_record,
)
from lorachain.models.denoisers import denoiser_component

__all__ = [
    "DIFFUSERS_FILE",
    "ERRORS_FILE",
    "FORMATS",
    "KOHYA_FILE",
    "RECORD_FILE",
    "UNET_DIR",
    "ExportError",
    "ExportSource",
    "ExportedLayer",
    "SvdSettings",
    "export_layers",
    "export_merge",
    "export_merge_job",
    "export_source",
    "export_state",
    "export_state_job",
    "summary_lines",
]


def export_layers(source: ExportSource, svd: SvdSettings) -> dict[str, ExportedLayer]:
    """Every layer's factors: exact where the source has low-rank terms, else the SVD of its delta."""
    if source.terms is not None:
        return {
            layer: concatenated(terms) for layer, terms in sorted(source.terms.items()) if any(c != 0 for c, _ in terms)
        }
    return {layer: svd_factors(layer, delta, svd) for layer, delta in sorted(source.dense().items())}


def _check_formats(formats, architecture: str) -> tuple[str, ...]:
    """The formats to write; None: the denoiser's defaults (U-Net: diffusers and kohya keys;
    transformer: diffusers keys, which diffusers, ComfyUI and kohya's sd-scripts all read)."""
    if formats is None:
        formats = default_formats(architecture)
    formats = tuple(dict.fromkeys(formats))
    unknown = [name for name in formats if name not in FORMATS]
    if unknown or not formats:
        raise ExportError(f"--format / export.formats: {unknown or 'none'} given; choose from {', '.join(FORMATS)}")
    if refused := format_problems(formats, architecture):
        raise ExportError(refused[0])
    return formats


def export_source(
    source: ExportSource,
    out: str | Path,
    *,
    formats=None,
    svd: SvdSettings | None = None,
    base_model: str | None = None,
) -> dict:
    """Write `source` in `formats` to directory `out` with its record, error table (SVD only),
    embeddings and model card; returns the record (what export.json holds)."""
    formats, svd = _check_formats(formats, source.architecture), svd or SvdSettings()
    layers = export_layers(source, svd)
    if not layers:
        raise ExportError(f"{source.location}: the {source.kind} changes no layer; there is nothing to export")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ranks = [layer.rank for layer in layers.values()]
    record = {
        "source": source.kind,
        "location": source.location,
        "method": source.method,
        "base_model": base_model or source.base_model,
        "architecture": source.architecture,
        "concepts": [item["concept"] for item in source.items],
        "exact": source.terms is not None,
        "svd": None if source.terms is not None else svd.describe(),
        "layers": len(layers),
        "rank": {"min": min(ranks), "max": max(ranks)},
        "relative_error": overall_error(layers),
        "max_layer_error": max(layer.relative_error for layer in layers.values()),
    }
    metadata = file_metadata(source, layers, record, "diffusers")
    written = []
    if "diffusers" in formats:
        written.append(write_diffusers(out, layers, metadata, denoiser_component(source.architecture)))
    if "kohya" in formats:
        written.append(write_kohya(out, layers, metadata))
    for fused in {"unet", "transformer"} & set(formats):
        written.append(write_denoiser(out, source, record["base_model"], fused))
    if not record["exact"]:
        written.append(write_errors(out, layers))
    record["embeddings"] = copy_embeddings(out, source)
    record["files"] = {_name(path): _size(path) for path in written}
    write_card(out, source, record)
    write_record(out, record)
    return record


def _name(path: Path) -> str:
    return f"{path.name}/" if path.is_dir() else path.name


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def export_state(task_dir, out, **options) -> dict:
    """Export the continual state ending at task directory `task_dir` (see :func:`export_source`)."""
    return export_source(state_source(task_dir), out, **options)


def export_merge(concept_dirs, merge_name: str, merge_params: dict, out, *, merge_key: str, **options) -> dict:
    """Export merge method `merge_name` (with `merge_params`; `merge_key` names it in messages) of
    the concept states in `concept_dirs` (see :func:`export_source`)."""
    return export_source(merge_source(list(concept_dirs), merge_name, dict(merge_params), merge_key), out, **options)


def summary_lines(record: dict, out) -> list[str]:
    """What the CLI and the jobs print about a finished export."""
    how = (
        "exact (sum of low-rank terms)"
        if record["exact"]
        else f"SVD {record['svd']}: relative Frobenius error {record['relative_error']:.4g} overall, "
        f"max {record['max_layer_error']:.4g} per layer (per layer: {Path(out) / ERRORS_FILE})"
    )
    lines = [
        f"exported {record['source']} {record['location']} ({record['method']['name']}) to {out}: "
        f"{record['layers']} layers, rank {record['rank']['min']}..{record['rank']['max']}, {how}"
    ]
    lines += [f"  {name}: {size} bytes" for name, size in sorted(record["files"].items())]
    lines += [f"  {entry['file']}: embeddings of {entry['token']}" for entry in record["embeddings"]]
    return lines


def _job_options(export: dict, model: str | None) -> dict:
    block = dict(export)
    svd = SvdSettings(
        rank=block.get("svd_rank"), energy=block.get("svd_energy"), flags="config keys export.svd_rank / svd_energy"
    )
    formats = block.get("formats")
    return {"formats": None if formats is None else tuple(formats), "svd": svd, "base_model": model}


def export_state_job(*, state, export: dict, model: str | None, out) -> dict:
    """The export_state job: the final state of a continual run (`state`: its manifest) into `out`."""
    record = export_state(Path(state).parent, out, **_job_options(export, model))
    print("\n".join(summary_lines(record, out)))
    return record


def export_merge_job(*, concept_dirs: list, method: str, merge_params: dict, merge: str, export: dict, model, out):
    """The export_merge job: merge label `merge` of the concepts in `concept_dirs` into `out`."""
    record = export_merge(
        list(concept_dirs),
        method,
        dict(merge_params),
        out,
        merge_key=f"modular.merges.{merge}",
        **_job_options(export, model),
    )
    print("\n".join(summary_lines(record, out)))
    return record
