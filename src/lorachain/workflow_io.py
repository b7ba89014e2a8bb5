"""Helpers shared by the thin workflow scripts (workflow/scripts/*.py)."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path


@contextlib.contextmanager
def job_log(path: str | Path):
    """Send a job's stdout, stderr and logging to its Snakemake log file; on failure the
    traceback lands there too, and Snakemake names the file in its error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", buffering=1) as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
        logging.basicConfig(stream=handle, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
        try:
            yield handle
        except BaseException:
            import traceback

            traceback.print_exc(file=handle)
            raise
