"""Helpers shared by the thin workflow scripts (workflow/scripts/*.py)."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path


KEPT_LOGS = 9  # earlier attempts kept beside a job's log: <log>.1 (the latest) .. <log>.9


def keep_earlier_log(path: Path, kept: int = KEPT_LOGS) -> None:
    """Move an existing log aside (<log>.1, shifting older ones up), so the traceback of a failed or
    interrupted attempt survives the rerun that follows it."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    for index in range(kept - 1, 0, -1):
        older = path.with_name(f"{path.name}.{index}")
        if older.exists():
            older.replace(path.with_name(f"{path.name}.{index + 1}"))
    path.replace(path.with_name(f"{path.name}.1"))


@contextlib.contextmanager
def job_log(path: str | Path):
    """Send a job's stdout, stderr and logging to its Snakemake log file; on failure the
    traceback lands there too, and Snakemake names the file in its error. A log left by an
    earlier attempt is kept as <log>.1 (see :func:`keep_earlier_log`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keep_earlier_log(path)
    with open(path, "w", buffering=1) as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
        logging.basicConfig(stream=handle, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
        try:
            yield handle
        except BaseException:
            import traceback

            traceback.print_exc(file=handle)
            raise
