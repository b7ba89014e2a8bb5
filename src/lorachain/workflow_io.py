"""Helpers shared by the thin workflow scripts (workflow/scripts/*.py)."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import sys
from pathlib import Path

from lorachain.devices import gpu_slots
from lorachain.methods import load_plugins

KEPT_LOGS = 9  # earlier failed attempts kept beside a job's log: <log>.1 (the latest) .. <log>.9


def _attempt_link(path: Path) -> Path:
    return path.with_name(f".{path.name}.attempt")


def keep_failed_log(source: Path, log: Path, kept: int = KEPT_LOGS) -> None:
    """Move `source` (a failed attempt's log) to <log>.1, shifting older ones up to <log>.<kept>."""
    for index in range(kept - 1, 0, -1):
        older = log.with_name(f"{log.name}.{index}")
        if older.exists():
            older.replace(log.with_name(f"{log.name}.{index + 1}"))
    source.replace(log.with_name(f"{log.name}.1"))


@contextlib.contextmanager
def job_log(path: str | Path):
    """Send a job's stdout, stderr and logging to its Snakemake log file; on failure the
    traceback lands there too, and Snakemake names the file in its error.

    Snakemake deletes a job's log before it runs the job again, so a failed attempt's traceback
    would be lost with it. While the job runs, the log has a second, hidden name (a hard link,
    ``.<log>.attempt``): a finished job drops it; a failed one renames it to ``<log>.1`` (older
    failures move up to ``<log>.9``); one killed outright (SIGKILL) leaves it, and the next attempt
    files it as ``<log>.1`` before it starts."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    attempt = _attempt_link(path)
    if attempt.exists():  # an attempt that was killed before it could file its log
        keep_failed_log(attempt, path)
    with open(path, "w", buffering=1) as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
        try:
            os.link(path, attempt)
        except OSError:  # a filesystem without hard links: the log is kept only until the rerun
            attempt = None
        logging.basicConfig(
            stream=handle, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
        )
        try:
            yield handle
        except BaseException:
            import traceback

            traceback.print_exc(file=handle)
            if attempt is not None:
                keep_failed_log(attempt, path)
            raise
    if attempt is not None:
        attempt.unlink(missing_ok=True)


RERUN_ONLY_PARAMS = ("revision",)


def job_arguments(snakemake) -> dict:
    """A job's named inputs, outputs and params as keyword arguments of its entry point: a rule
    names them as the entry point's parameters, so the script adds nothing. Unnamed inputs (files a
    job reads by a path given in its params, such as a built model) and the ``revision`` param
    (recorded only so that bumping it reruns the job) are not passed. A name used twice is an error
    (a rule's input and param would shadow each other)."""
    arguments = {}
    # snakemake.params (like .input, .output) is a property that builds a new object on every
    # access, so the section is told by its name, not by identity
    for kind, section in (("input", snakemake.input), ("output", snakemake.output), ("params", snakemake.params)):
        for name, value in section.items():
            if kind == "params" and name in RERUN_ONLY_PARAMS:
                continue
            if name in arguments:
                raise ValueError(f"rule {snakemake.rule}: {name!r} is named twice among its input, output and params")
            arguments[name] = list(value) if isinstance(value, list) else value
    return arguments


def run_job(snakemake, entry_point: str) -> None:
    """The whole of a workflow script: import `entry_point` ("module:function") inside the job's
    log, with the config's method plugins registered, torch held to the job's threads and, for a
    job with a ``gpu`` resource, GPUs of its own (:func:`lorachain.devices.gpu_slots`, taken before
    anything starts CUDA); call it with :func:`job_arguments`; print what it returns."""
    gpus = int(dict(snakemake.resources.items()).get("gpu", 0) or 0)
    with job_log(snakemake.log[0]), gpu_slots(gpus):
        # torch reads these when it starts; modules that import torch lazily start it later
        for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[variable] = str(snakemake.threads)
        load_plugins(snakemake.config.get("plugins") or [])  # a plugin's methods, for make_method by name
        module, _, function = entry_point.partition(":")
        job = getattr(importlib.import_module(module), function)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(snakemake.threads)
        result = job(**job_arguments(snakemake))
        if result is not None:
            print(json.dumps(result, indent=2, default=str))
