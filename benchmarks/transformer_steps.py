"""Training step time of the tiny pipelines per architecture: SD 1.x and SDXL (U-Nets, DDPM
epsilon-prediction) against SD3 (SD3.5-medium-like MMDiT) and FLUX.1-dev (flow matching, packed
latents, guidance embedding), all built by ``lorachain.models.tiny``.

Each measurement is lorachain's own trainer (``lorachain.train.train_task``, merge_init, rank 4,
64 px, fp32, one torch thread) run twice on the same task, for ``--warmup`` steps and for
``--warmup + --steps`` steps; the step time is the difference of the two runs' training-loop time
(``timings["train_s"]``) over ``--steps``, so loading, encoding and writing do not count and the
first steps' one-off costs cancel. ``--repeats`` such pairs give the median. The machine may be
shared: the 1-minute load average is printed with the table.

Usage: ``python benchmarks/transformer_steps.py [--steps 20] [--warmup 3] [--repeats 3]``
(CPU; about two minutes with the defaults). Prints a markdown table only.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

ARCHITECTURES = ("sd1", "sdxl", "sd3", "flux")
BATCHES = (1, 2)
TRAINING = dict(rank=4, lora_alpha=4, learning_rate=1e-4, resolution=64, checkpoint_every=0)
GUIDANCE = {"flux": {"guidance": 3.5}}  # FLUX.1-dev trains at a guidance value


def train_seconds(base: Path, images: list[str], out: Path, steps: int, batch: int, architecture: str) -> float:
    from lorachain.train import train_task

    manifest = train_task(
        model_source=str(base),
        train_images=images,
        train_prompt="a photo of sks backpack",
        task_index=1,
        previous_state=None,
        method_name="merge_init",
        method_params={},
        training={**TRAINING, **GUIDANCE.get(architecture, {}), "steps": steps, "batch_size": batch},
        seed=0,
        output_dir=out,
        progress=False,
    )
    return manifest["timings"]["train_s"]


def step_ms(base, images, root: Path, architecture: str, batch: int, args) -> float:
    short = train_seconds(base, images, root / "short", args.warmup, batch, architecture)
    long = train_seconds(base, images, root / "long", args.warmup + args.steps, batch, architecture)
    return (long - short) / args.steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="steps of the run subtracted")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per cell (median)")
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES), choices=ARCHITECTURES)
    args = parser.parse_args()

    import torch

    from lorachain.data import generate_dreambooth_like
    from lorachain.models.tiny import save_tiny_pipeline

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TQDM_DISABLE", "1")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        data = generate_dreambooth_like(root / "data", subjects={"backpack": "backpack"}, images_per_subject=3, size=64)
        images = sorted(str(path) for path in (data / "backpack").glob("*.jpg"))
        rows = []
        for architecture in args.architectures:
            base = save_tiny_pipeline(architecture, root / "models" / architecture, seed=0)
            cells = []
            for batch in BATCHES:
                times = [
                    step_ms(base, images, root / f"{architecture}-{batch}-{repeat}", architecture, batch, args)
                    for repeat in range(args.repeats)
                ]
                cells.append(statistics.median(times))
            rows.append((architecture, cells))
    load = os.getloadavg()[0]
    print(
        f"Training step time, tiny pipelines, merge_init rank 4, 64 px, fp32, 1 thread "
        f"({platform.processor() or platform.machine()}, torch {torch.__version__}; median of {args.repeats} x "
        f"{args.steps} steps; 1-min load average {load:.2f})\n"
    )
    print("| architecture | " + " | ".join(f"batch {batch} (ms/step)" for batch in BATCHES) + " |")
    print("|---|" + "---:|" * len(BATCHES))
    for architecture, cells in rows:
        print(f"| {architecture} | " + " | ".join(f"{cell:.0f}" for cell in cells) + " |")


if __name__ == "__main__":
    main()
