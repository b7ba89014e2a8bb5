"""Seconds per training step with live tracking on (tensorboard, the default) and off.

Trains task 1 of the miniature world's pipeline (``--pipeline``, default the demo's prebuilt world)
with the demo's training block (config/demo.yaml: rank 4, 32 px, batch 4) on a small synthetic
DreamBooth-layout concept, ``--steps`` steps per run, alternating tracking off / tensorboard for
``--repeats`` pairs in one process (one thread, as a training job), and prints the median seconds
per step of each (the trainer's own ``train_s`` timing: the loop only, loading and writing
excluded) and the overhead. Tracking on includes loss.csv's live lines, the gradient norm
computed for the tracker and the event files; tracking off still writes the live loss.csv (it is
not optional). The states of both are checked byte-identical.

Usage: ``python benchmarks/tracking.py [--pipeline DIR] [--steps 100] [--repeats 3]``. CPU or GPU;
prints figures only.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

from lorachain.state import LORA_FILE  # noqa: E402
from lorachain.torch_env import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PIPELINE = "/tmp/demo/resources/world/pipeline"


def train_once(pipeline: str, images: list[str], training: dict, output: Path) -> tuple[float, float]:
    """Seconds per step of the loop, and of the whole call (loading, tracker start, writing)."""
    from lorachain.train import train_task

    manifest = train_task(
        model_source=pipeline,
        train_images=images,
        train_prompt="a photo of sks backpack",
        task_index=1,
        previous_state=None,
        method_name="merge_init",
        method_params={},
        training=training,
        seed=0,
        output_dir=str(output),
        run={"method": "merge_init", "seed": 0},
        concept="backpack",
        loss_log=str(output / "loss.csv"),
        progress=False,
    )
    timings = manifest["timings"]
    return timings["train_s"] / training["steps"], timings["total_s"]


def calls_alone(directory: Path, steps: int = 2000) -> float:
    """Seconds per step of what tracking adds to a step, timed alone: accelerate's log of loss, lr
    and grad norm to tensorboard plus a live loss.csv line (no training around it)."""
    import time

    from accelerate import Accelerator

    from lorachain.training.tracking import LossLog, StepTracker, TrackingConfig, accelerator_options

    tracking = TrackingConfig()
    accelerator = Accelerator(cpu=True, **accelerator_options(tracking, directory))
    tracker = StepTracker(accelerator, tracking, directory, run_name="calls")
    tracker.start({"steps": steps}, fresh=True)
    with LossLog(directory / "loss.csv", []) as live:
        started = time.perf_counter()
        for step in range(steps):
            tracker.log_step(step, 0.1 + step * 1e-6, 1e-3, 0.5)
            live.append(step, 0.1 + step * 1e-6)
        seconds = time.perf_counter() - started
    tracker.end()
    return seconds / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default=DEFAULT_PIPELINE, help="a diffusers pipeline directory")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from lorachain.data import generate_dreambooth_like

    demo = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())["training"]
    base = {**demo, "steps": args.steps, "checkpoint_every": 0}
    settings = {"off": {"log_with": "none"}, "tensorboard": {"log_with": "tensorboard"}}
    seconds = {name: [] for name in settings}
    totals = {name: [] for name in settings}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        data = generate_dreambooth_like(scratch / "data", subjects={"backpack": "backpack"}, size=64, seed=0)
        images = sorted(str(path) for path in (data / "backpack").glob("*.jpg"))
        for repeat in range(args.repeats):
            for name, tracking in settings.items():
                output = scratch / f"{name}{repeat}"
                per_step, total = train_once(args.pipeline, images, {**base, "tracking": tracking}, output)
                seconds[name].append(per_step)
                totals[name].append(total)
        alone = calls_alone(scratch / "calls")
        lora = {name: (scratch / f"{name}0" / LORA_FILE).read_bytes() for name in settings}
        assert lora["off"] == lora["tensorboard"], "tracking changed the trained state"
    off, on = (statistics.median(seconds[name]) for name in ("off", "tensorboard"))
    print(f"pipeline {args.pipeline}; {args.steps} steps x {args.repeats} runs each; config/demo.yaml's training")
    for name in settings:
        print(
            f"  tracking {name:<11}: {statistics.median(seconds[name]) * 1e3:8.2f} ms/step (runs: "
            + ", ".join(f"{value * 1e3:.2f}" for value in seconds[name])
            + ")"
        )
    print(f"  overhead        : {(on - off) * 1e3:+8.2f} ms/step ({(on / off - 1) * 100:+.1f} %)")
    off_total, on_total = (statistics.median(totals[name]) for name in ("off", "tensorboard"))
    print(f"  whole call      : {off_total:.2f} s off, {on_total:.2f} s tensorboard (tracker start and close included)")
    print(f"  tracking calls alone: {alone * 1e6:.0f} us/step (accelerator.log to tensorboard + a loss.csv.live line)")
    print("  states byte-identical with tracking on and off: yes")


if __name__ == "__main__":
    main()
