"""Wall time of the demo and its split into imports, training and I/O (prints figures; not a test).

Runs `snakemake --profile profiles/local` on config/demo.yaml in a fresh directory, then reads each
training job's own timings (printed as JSON at the end of its log) and Snakemake's benchmark files:
  imports  = job wall time - time inside train_task (interpreter start, imports, reading the task list)
  I/O      = loading the pipeline, folding the previous state, reading images, writing the state
  training = the optimisation loop (including VAE/text encoding once per task)

    python benchmarks/demo_timing.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def last_json_object(text: str) -> dict:
    start = text.rindex("\n{") + 1
    return json.loads(text[start:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, help="run in this directory and keep it")
    args = parser.parse_args()
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="lorachain-demo-"))
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
        str(ROOT / "config" / "demo.yaml"),
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - started

    totals = {"jobs": 0, "job_wall": 0.0, "imports": 0.0, "io": 0.0, "training": 0.0}
    for log in sorted((workdir / "logs").rglob("task*.log")):
        timings = last_json_object(log.read_text())["timings"]
        bench = workdir / "results" / "benchmarks" / log.relative_to(workdir / "logs").with_suffix(".tsv")
        with open(bench) as handle:
            job_wall = float(next(csv.DictReader(handle, delimiter="\t"))["s"])
        totals["jobs"] += 1
        totals["job_wall"] += job_wall
        totals["imports"] += job_wall - timings["total_s"]
        totals["io"] += (
            timings["load_s"]
            + timings["write_s"]
            + (timings["total_s"] - timings["load_s"] - timings["train_s"] - timings["write_s"])
        )
        totals["training"] += timings["train_s"]
    other = wall - totals["job_wall"]
    print(f"demo wall time: {wall:.1f} s on {os.cpu_count()} cores ({totals['jobs']} training jobs, {workdir})")
    print(f"{'part':<56}{'seconds':>9}{'share':>8}")
    for name, seconds in [
        ("training jobs: imports + start-up", totals["imports"]),
        ("training jobs: I/O (load/fold/write)", totals["io"]),
        ("training jobs: training loop", totals["training"]),
        ("everything else (Snakemake, model build, data, tasks)", other),
    ]:
        print(f"{name:<56}{seconds:>9.1f}{seconds / wall:>8.0%}")


if __name__ == "__main__":
    main()
