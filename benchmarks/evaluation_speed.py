"""Sampling and scoring speed on the demo models (prints figures; not a test).

Reads the JSON timings every sampling and scoring job prints at the end of its log, in a finished
demo run (`--dir`), or runs the demo first in a temporary directory:
  sampling  images/s = images / time in the diffusers pipeline calls (model load excluded)
  scoring   images/s = images / time embedding and scoring them (model load excluded)
  load share         = time loading the embedding models / the scoring job's time in the library
and the jobs' wall times from Snakemake's benchmark files (interpreter start and imports included).

    python benchmarks/evaluation_speed.py [--dir DEMO_RUN]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def last_json_object(text: str) -> dict:
    return json.loads(text[text.rindex("\n{") + 1 :])


def job_wall(workdir: Path, log: Path) -> float:
    bench = workdir / "results" / "benchmarks" / log.relative_to(workdir / "logs").with_suffix(".tsv")
    with open(bench) as handle:
        return float(next(csv.DictReader(handle, delimiter="\t"))["s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, help="a finished demo run (default: run the demo in a temporary directory)")
    args = parser.parse_args()
    workdir = args.dir
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="lorachain-demo-"))
        command = [
            sys.executable,
            "-m",
            "snakemake",
            "--snakefile",
            str(ROOT / "Snakefile"),
            "--directory",
            str(workdir),
            "--profile",
            str(ROOT / "profiles" / "local"),
            "--configfile",
            str(ROOT / "config" / "tiny.yaml"),
        ]
        subprocess.run(command, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})

    sampling = [(log, last_json_object(log.read_text())) for log in sorted((workdir / "logs").rglob("samples*.log"))]
    scoring = [(log, last_json_object(log.read_text())) for log in sorted((workdir / "logs").rglob("scores.log"))]
    images = sum(t["images"] for _, t in sampling)
    seconds = sum(t["sample_s"] for _, t in sampling)
    load = sum(t["load_s"] for _, t in sampling)
    wall = sum(job_wall(workdir, log) for log, _ in sampling)
    print(f"demo run: {workdir} ({os.cpu_count()} cores)")
    print(
        f"sampling: {len(sampling)} jobs, {images} images, {images / seconds:.1f} images/s in the pipeline; "
        f"pipeline load + state fold {load:.1f} s; job wall time {wall:.1f} s ({images / wall:.2f} images/s end to end)"
    )
    images = sum(t["images"] for _, t in scoring)
    seconds = sum(t["score_s"] for _, t in scoring)
    print(
        f"scoring:  {len(scoring)} jobs, {images} images, {images / seconds:.1f} images/s embedded and scored; "
        f"job wall time {sum(job_wall(workdir, log) for log, _ in scoring):.1f} s"
    )
    print(f"{'scoring job':<60}{'images':>7}{'load s':>8}{'total s':>9}{'load share':>11}")
    for log, t in scoring:
        print(
            f"{str(log.relative_to(workdir / 'logs')):<60}{t['images']:>7}"
            f"{t['load_models_s']:>8.2f}{t['total_s']:>9.2f}{t['load_share']:>11.0%}"
        )
    shares = [t["load_share"] for _, t in scoring]
    print(
        f"model loading share of scoring jobs: mean {sum(shares) / len(shares):.0%}, "
        f"min {min(shares):.0%}, max {max(shares):.0%}"
    )


if __name__ == "__main__":
    main()
