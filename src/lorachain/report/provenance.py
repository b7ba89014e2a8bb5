"""The run's provenance table: which package versions, lorachain commit and model revision
produced its states and tables (each state's manifest and each table's provenance columns,
:mod:`lorachain.provenance`). One row per group of files and distinct provenance; a group with
more than one row was produced by different versions (``mixed``), which a results table that
averages over those states would otherwise hide.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from lorachain import paths, plan
from lorachain.provenance import COLUMNS, columns

TABLE_COLUMNS = ("group", "kind", "files", "first_file", *COLUMNS, "mixed")
TABLES_GROUP = "tables"


def continual_state_files(config: dict) -> dict[str, list[str]]:
    """Each continual domain's task manifests (the states its table summarises)."""
    return {
        domain: [
            f"{paths.task_dir(domain, method, order, seed, task)}/{paths.STATE_FILE}"
            for method, order, seed in plan.runs(config)
            for task in range(1, block["num_tasks"] + 1)
        ]
        for domain, block in config["domains"].items()
    }


def modular_state_files(config: dict) -> dict[str, list[str]]:
    """Each modular set's concept manifests (every adapter kind's)."""
    adapters = plan.modular(config).get("adapters") or {}
    return {
        f"{name}-modular": [
            f"{paths.CONCEPT_DIR.format(domain=name, adapter=adapter, concept=label)}/{paths.STATE_FILE}"
            for adapter in adapters
            for label in plan.concept_labels(config, name)
        ]
        for name in plan.modular_sets(config)
    }


def state_groups(config: dict) -> dict[str, list[str]]:
    """group -> the manifests of the states one results table is made of."""
    return {**continual_state_files(config), **modular_state_files(config)}


def table_files(config: dict) -> list[str]:
    """The run's results tables that carry provenance columns (continual, modular, composition)."""
    tables, own = f"{paths.RESULTS}/tables/", f"{paths.PROVENANCE_TABLE}.csv"
    return [
        path
        for path in plan.all_outputs(config)
        if path.startswith(tables) and path.endswith(".csv") and not path.endswith("-by-k.csv") and path != own
    ]


class ProvenanceTableError(RuntimeError):
    """A state or table that cannot be read; names the file."""


def state_columns(path: str | Path) -> dict:
    """The provenance columns a state's manifest records (all empty for a state written before
    lorachain recorded provenance)."""
    try:
        manifest = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ProvenanceTableError(f"{path}: cannot read the state manifest ({error}); rerun the task") from None
    return columns(manifest.get("provenance") or {})


def table_columns(path: str | Path) -> list[dict]:
    """The distinct provenance columns of a table's rows (empty where it has none)."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    found = []
    for row in rows:
        values = {name: row.get(name) or None for name in COLUMNS}
        if values not in found:
            found.append(values)
    return found or [dict.fromkeys(COLUMNS)]


def _normal(values: dict) -> dict:
    """Columns as text, the way a CSV reads them back (so states and tables compare)."""
    return {name: None if values.get(name) is None else str(values[name]) for name in COLUMNS}


def group_rows(group: str, kind: str, files: list[tuple[str, dict]]) -> list[dict]:
    """One row per distinct provenance among `files` ((path, columns) pairs), in first-seen order."""
    rows: dict[tuple, dict] = {}
    for path, values in files:
        values = _normal(values)
        key = tuple(values.values())
        if key not in rows:
            rows[key] = {"group": group, "kind": kind, "files": 0, "first_file": str(path), **values}
        rows[key]["files"] += 1
    mixed = len(rows) > 1
    return [{**row, "mixed": mixed} for row in rows.values()]


def provenance_rows(states: dict[str, list], tables: list) -> list[dict]:
    """The provenance table's rows: each group of states, then the tables."""
    rows = []
    for group, files in states.items():
        rows += group_rows(group, "states", [(path, state_columns(path)) for path in files])
    rows += group_rows(TABLES_GROUP, "tables", [(path, values) for path in tables for values in table_columns(path)])
    return rows


def markdown(rows: list[dict]) -> str:
    shown = ("group", "kind", "files", *COLUMNS)
    lines = [
        "# Provenance",
        "",
        "Package versions, lorachain commit (dirty: uncommitted changes) and base-model revision "
        "(hub commit, or `local:` and a fingerprint of a local model's config files) recorded by the "
        "states and tables of this run.",
        "",
        "| " + " | ".join(shown) + " |",
        "|" + "---|" * len(shown),
    ]
    lines += ["| " + " | ".join("" if row[name] is None else str(row[name]) for name in shown) + " |" for row in rows]
    mixed = list(dict.fromkeys(row["group"] for row in rows if row["mixed"]))
    lines.append("")
    if mixed:
        lines.append(f"**Mixed provenance**: {', '.join(mixed)} were produced by different versions; rerun to compare.")
    else:
        lines.append("Every group was produced by one set of versions.")
    return "\n".join(lines) + "\n"


def provenance_table_job(*, states: dict, tables: list, table, markdown_table) -> list[dict]:
    """The provenance_table job: CSV `table` and Markdown `markdown_table` of the run's
    provenance (`states`: group -> state manifests; `tables`: results tables)."""
    rows = provenance_rows({group: list(files) for group, files in states.items()}, list(tables))
    Path(table).parent.mkdir(parents=True, exist_ok=True)
    with open(table, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(TABLE_COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    Path(markdown_table).write_text(markdown(rows))
    return rows
