"""A job's log: a failed or killed attempt's log survives the rerun (Snakemake deletes the declared
log before it runs a job again)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from lorachain.workflow_io import job_log


def attempt(log, fail: bool) -> None:
    if log.exists():
        log.unlink()  # what Snakemake does before it runs the job again
    try:
        with job_log(log):
            print("working")
            if fail:
                raise RuntimeError("attempt failed")
            print("done")
    except RuntimeError:
        pass


def test_a_failed_attempts_log_is_kept_beside_the_next(tmp_path):
    log = tmp_path / "logs" / "task02.log"
    attempt(log, fail=True)
    attempt(log, fail=True)
    attempt(log, fail=False)
    assert "done" in log.read_text() and "attempt failed" not in log.read_text()
    for kept in (log.with_name("task02.log.1"), log.with_name("task02.log.2")):
        assert "RuntimeError: attempt failed" in kept.read_text()
    assert sorted(p.name for p in log.parent.iterdir()) == [
        "task02.log",
        "task02.log.1",
        "task02.log.2",
    ]  # no hidden link left


def test_a_killed_attempts_log_is_filed_by_the_next_attempt(tmp_path):
    log = tmp_path / "task02.log"
    code = textwrap.dedent(f"""
        import os, signal
        from lorachain.workflow_io import job_log
        with job_log({str(log)!r}):
            print("step 7 of 850", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    attempt(log, fail=False)
    assert "step 7 of 850" in log.with_name("task02.log.1").read_text()
    assert "done" in log.read_text()


@pytest.mark.skipif(not hasattr(os, "link"), reason="no hard links")
def test_a_finished_job_leaves_only_its_log(tmp_path):
    log = tmp_path / "a.log"
    attempt(log, fail=False)
    assert [p.name for p in tmp_path.iterdir()] == ["a.log"]


def test_job_arguments_pass_named_items_but_not_the_revision():
    """Snakemake's script object builds .input/.output/.params anew on every access (properties)."""
    from snakemake.iocontainers import Namedlist

    from lorachain.workflow_io import job_arguments

    def named(unnamed, **items):
        section = Namedlist([*unnamed, *items.values()])
        for index, name in enumerate(items, start=len(unnamed)):
            section._set_name(name, index)
        return section

    class Script:
        rule = "r"
        input = property(lambda self: named(["model-dir"], tasks="t.json"))
        output = property(lambda self: named([], state="s.json"))
        params = property(lambda self: named([], revision=3, seed=1))

    assert job_arguments(Script()) == {"tasks": "t.json", "state": "s.json", "seed": 1}
