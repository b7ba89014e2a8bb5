"""One GPU per job on a workstation with several: a pool of device slots shared by concurrent jobs.

Snakemake's local executor counts a ``gpu`` resource (``--resources gpu=N`` caps the jobs that
run at once) but does not say which device a job gets: every job would see all GPUs and use the
first. :func:`gpu_slots` gives each job that requests ``gpu=k`` k devices of its own: slot ``i`` is
held by an exclusive ``fcntl.flock`` on ``<lock dir>/gpu<device>.lock`` for the job's life, and the
job's ``CUDA_VISIBLE_DEVICES`` names the slots' devices. The kernel drops a flock when its process
ends, however it ends (an exception, SIGKILL, a crash), so a slot is never left taken.

* The pool: ``LORACHAIN_GPUS``, the device ids of the slots (``0,1,2,3``, or ``2,3`` to leave 0
  and 1 alone; a repeated id, ``0,0``, lets two jobs share one device); without it, the NVIDIA
  GPUs the driver lists in ``/proc/driver/nvidia/gpus`` (counted without initialising CUDA, which must not start
  before ``CUDA_VISIBLE_DEVICES`` is set). No GPU: no slot is taken and nothing is set.
* The lock directory: ``LORACHAIN_GPU_LOCK_DIR``, else ``<tmp>/lorachain-gpus-<uid>``, so that
  every workflow of one user on the machine shares the pool.
* A scheduler that already set ``CUDA_VISIBLE_DEVICES`` (SLURM's ``--gpus``) owns the choice: it is
  kept, and no slot is taken.

When every slot is held (another workflow on the machine, or ``--resources gpu`` above the pool's
size) the job waits for one, and says so in its log.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

POOL_VARIABLE = "LORACHAIN_GPUS"
LOCK_DIR_VARIABLE = "LORACHAIN_GPU_LOCK_DIR"
VISIBLE = "CUDA_VISIBLE_DEVICES"
_NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")
_POLL_S = 0.5

log = logging.getLogger(__name__)


class DeviceError(ValueError):
    """A GPU pool setting that cannot be used; the message names the variable and the fix."""


def pool_devices() -> list[str]:
    """The device id of every slot: from ``LORACHAIN_GPUS``, else one per NVIDIA GPU the driver lists."""
    spec = os.environ.get(POOL_VARIABLE, "").strip()
    if not spec:
        return [str(index) for index in range(_driver_gpu_count())]
    devices = [item.strip() for item in spec.split(",")]
    if not all(devices):
        raise DeviceError(f"environment variable {POOL_VARIABLE}={spec!r}: give device ids separated by commas (0,1,2)")
    return devices


def _driver_gpu_count() -> int:
    """NVIDIA GPUs the driver lists (one directory each); 0 without the driver. Reading the driver's
    listing, unlike torch.cuda.device_count(), leaves CUDA uninitialised in this process."""
    try:
        return sum(1 for _ in _NVIDIA_GPUS.iterdir())
    except OSError:
        return 0


def lock_dir() -> Path:
    configured = os.environ.get(LOCK_DIR_VARIABLE)
    directory = Path(configured) if configured else Path(tempfile.gettempdir()) / f"lorachain-gpus-{os.getuid()}"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _try_lock(path: Path):
    """An open handle holding an exclusive flock on `path`, or None when another process holds it."""
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")  # who holds it, for a person looking at the directory
    handle.flush()
    return handle


def slot_locks(devices: list[str], directory: Path) -> list[Path]:
    """The lock file of each slot, named by its device (``gpu2.lock``; a device's second slot
    ``gpu2.1.lock``), so that workflows with different pools still agree on who holds a device."""
    locks = []
    for index, device in enumerate(devices):
        repeat = devices[:index].count(device)
        locks.append(directory / (f"gpu{device}.lock" if repeat == 0 else f"gpu{device}.{repeat}.lock"))
    return locks


def _take(count: int, devices: list[str], directory: Path) -> list[tuple[int, object]]:
    """`count` free slots (index, handle), waiting while fewer are free; all-or-nothing per attempt
    so that two jobs each holding part of what they need cannot wait on each other."""
    waited = False
    locks = slot_locks(devices, directory)
    while True:
        held = []
        for index, lock in enumerate(locks):
            handle = _try_lock(lock)
            if handle is not None:
                held.append((index, handle))
                if len(held) == count:
                    return held
        for _, handle in held:
            handle.close()
        if not waited:
            log.info("waiting for %d free GPU slot(s) of %d in %s", count, len(devices), directory)
            waited = True
        time.sleep(_POLL_S)


@contextlib.contextmanager
def gpu_slots(count: int) -> Iterator[str | None]:
    """Hold `count` device slots for the enclosed job and point ``CUDA_VISIBLE_DEVICES`` at them;
    yields its value (None when nothing was set: no GPU requested, none present, or a scheduler's
    choice kept). Must run before CUDA initialises in this process."""
    if count <= 0 or os.environ.get(VISIBLE) is not None:
        yield os.environ.get(VISIBLE) if count > 0 else None
        return
    devices = pool_devices()
    if not devices:
        yield None
        return
    if count > len(devices):
        raise DeviceError(
            f"a job requests gpu={count} but the pool has {len(devices)} device(s) ({POOL_VARIABLE} or the driver's "
            "list); lower the rule's gpu resource or enlarge the pool"
        )
    _refuse_initialised_cuda()
    held = _take(count, devices, lock_dir())
    os.environ[VISIBLE] = ",".join(devices[index] for index, _ in held)
    log.info("GPU slot(s) %s: %s=%s", [index for index, _ in held], VISIBLE, os.environ[VISIBLE])
    try:
        yield os.environ[VISIBLE]
    finally:
        del os.environ[VISIBLE]
        for _, handle in held:
            handle.close()  # closing the last handle drops the flock


def _refuse_initialised_cuda() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise DeviceError(
            f"CUDA was initialised before the job's GPU slot was taken, so {VISIBLE} would be ignored; "
            "take the slot (lorachain.devices.gpu_slots) before anything touches CUDA"
        )
