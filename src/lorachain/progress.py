"""Progress of a job's long loops (training, sampling, scoring), with a rate and an ETA, in the job's log.

A tqdm bar on stderr, which a workflow job sends to its log file (:func:`lorachain.workflow_io.job_log`).
In a terminal it is the usual bar; in a file each update is its own line, every `interval` seconds
(a carriage-return bar would make one endless line of a log), e.g.::

    sampling: 40/128 [00:12<00:27, 3.21 img/s]

It writes nothing but the log: the files a job writes do not depend on it.
"""

from __future__ import annotations

import sys

LOG_INTERVAL_S = 10.0  # seconds between two lines in a log file


class _Lines:
    """A stream that turns tqdm's carriage-return refreshes into lines."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(
    total: int, desc: str, unit: str = "img", interval: float | None = None, disable: bool = False, initial: int = 0
):
    """A progress bar over `total` `unit`s, `initial` of them done (advance it with ``update(n)``;
    close it, or use it as a context manager). On a terminal it refreshes in place; in a log file it
    writes a line every `interval` seconds (:data:`LOG_INTERVAL_S`) and one at the end."""
    from tqdm.std import tqdm

    stream = sys.stderr
    terminal = hasattr(stream, "isatty") and stream.isatty()
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        file=stream if terminal else _Lines(stream),
        mininterval=interval if interval is not None else (0.5 if terminal else LOG_INTERVAL_S),
        maxinterval=max(LOG_INTERVAL_S, interval or 0.0),
        ascii=not terminal,
        dynamic_ncols=terminal,
        disable=disable,
    )
