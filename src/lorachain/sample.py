"""Sample a state (or the base model) on the evaluation prompts of its tasks.

Paired design, as in the reference: one fixed set of N initial noises (seeded once) is used for
every prompt, task, method and run, so two models differ in their images only through their
weights. Images are PNG files; an ``index.csv`` beside them says what each one is (model, run,
after which task, on which task, prompt, noise). Paths in the index are relative to its directory,
so a samples directory can be moved. With ``prior_samples`` (the default) each task also gets its
class prompt without the concept ("a photo of sneaker", role ``prior``, prompt index -1), sampled
with the same noises, for the prior-drift metrics (docs/metrics.md#prior-drift).
"""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from lorachain.data.selection import Task
from lorachain.progress import progress
from lorachain.torch_env import torch

INDEX_FILE = "index.csv"
INDEX_COLUMNS = (
    "path",
    "model",
    "method",
    "domain",
    "order",
    "seed",
    "after_task",
    "task",
    "concept",
    "role",
    "prompt_index",
    "prompt",
    "plain_prompt",
    "sample",
    "noise_seed",
)
# The role of an image: a concept prompt (scored by every concept metric) or the concept's class
# prompt without the concept (scored only by the prior-drift metrics, against the base model's).
CONCEPT, PRIOR = "concept", "prior"
PRIOR_PROMPT_INDEX = -1
_DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class SamplingError(RuntimeError):
    """Bad sampling input (state, scheduler, config); the message names the file or config key."""


@dataclass(frozen=True)
class SamplingConfig:
    num_samples: int = 8  # per prompt; the reference draws 8
    noise_seed: int = 42
    steps: int = 50
    guidance_scale: float = 5.0
    resolution: int = 1024
    batch_size: int = 8
    scheduler: str = "default"  # a diffusers scheduler class name, or the pipeline's own
    precision: str = "no"
    # also sample each task's class prompt without the concept (Task.prior_prompt) with the same
    # noises: the prior-drift metrics compare those images with the base model's (BlockLoRA Fig. 3)
    prior_samples: bool = True

    @classmethod
    def from_dict(cls, block: dict) -> "SamplingConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(block) - known)
        if unknown:
            raise SamplingError(f"config key sampling: unknown keys {unknown}; allowed: {sorted(known)}")
        config = cls(**block)
        if config.resolution % 8:
            raise SamplingError(
                f"config key sampling.resolution: {config.resolution} is not a multiple of 8 (the VAE downsamples 8x)"
            )
        if config.precision not in _DTYPES:
            raise SamplingError(
                f"config key sampling.precision: {config.precision!r}, expected one of {sorted(_DTYPES)}"
            )
        return config


def initial_noises(config: SamplingConfig, latent_channels: int, vae_scale: int = 8) -> torch.Tensor:
    """The N initial latents every prompt, task and model starts from (float32, CPU)."""
    size = config.resolution // vae_scale
    generator = torch.Generator("cpu").manual_seed(config.noise_seed)
    return torch.randn((config.num_samples, latent_channels, size, size), generator=generator, dtype=torch.float32)


def set_scheduler(pipe, name: str) -> None:
    if name == "default":
        return
    import diffusers

    scheduler_class = getattr(diffusers, name, None)
    if scheduler_class is None or not name.endswith("Scheduler"):
        raise SamplingError(
            f"config key sampling.scheduler: {name!r} is not a diffusers scheduler class "
            "(e.g. EulerDiscreteScheduler, DDIMScheduler) or 'default'"
        )
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)


def device_for_sampling() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model_for_sampling(
    model_source: str,
    vae: str | None,
    state_dir,
    method_name: str | None,
    method_params: dict | None,
    precision: str = "no",
):
    """The base pipeline, with the state that ends at `state_dir` applied to its U-Net (None: base)
    and the concept embeddings of every task of its chain loaded (those trained with embedding
    tuning; :func:`lorachain.embeddings.load_state_embeddings`)."""
    from lorachain.embeddings import load_state_embeddings
    from lorachain.methods import make_method
    from lorachain.models.denoisers import denoiser, family_of, sampling_precision_problem
    from lorachain.models.loading import load_pipeline
    from lorachain.state import STATE_FILE, StateError, apply_to_unet, fold_state, read_chain, read_manifest

    dtype = _DTYPES[precision]
    pipe = load_pipeline(model_source, vae=vae, torch_dtype=dtype)
    if problem := sampling_precision_problem(family_of(pipe).name, precision):
        raise SamplingError(f"{problem} (model {model_source})")
    if state_dir is not None:
        manifest = read_manifest(state_dir)
        manifest_file = Path(state_dir) / STATE_FILE
        if manifest.get("architecture") != type(pipe).__name__:
            raise StateError(
                f"{manifest_file}: written for a {manifest.get('architecture')}, "
                f"but model {model_source!r} is a {type(pipe).__name__}"
            )
        if manifest.get("base_model") != str(model_source):
            raise StateError(
                f"{manifest_file}: trained on base model {manifest.get('base_model')!r}, not {str(model_source)!r}; "
                "sample it with its own base model"
            )
        state = fold_state(state_dir, make_method(method_name, method_params or {}))
        apply_to_unet(denoiser(pipe), state)
        if state.embeddings:
            load_state_embeddings(pipe, [directory for directory, _ in read_chain(state_dir)])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image_name(task_index: int, prompt_index: int, sample: int) -> str:
    prompt = "prior" if prompt_index == PRIOR_PROMPT_INDEX else f"p{prompt_index}"
    return f"task{task_index:02d}/{prompt}-n{sample}.png"


def prompts_of(task: Task, prior_samples: bool) -> list[tuple[int, str]]:
    """(prompt index, prompt) of a task's sample set: its evaluation prompts, then its class
    prompt without the concept (index PRIOR_PROMPT_INDEX) when prior samples are asked for."""
    prompts = list(enumerate(task.eval_prompts))
    return prompts + [(PRIOR_PROMPT_INDEX, task.prior_prompt)] if prior_samples else prompts


@torch.no_grad()
def sample_tasks(
    pipe,
    tasks: list[tuple[int, Task]],
    config: SamplingConfig,
    output_dir: str | Path,
    identity: dict,
) -> dict:
    """Sample every (task, prompt, noise) into `output_dir` (PNG + index.csv); returns timings.

    `tasks` holds (task index, Task); `identity` fills the index's model/method/domain/order/seed/
    after_task columns. The directory is written under a temporary name and renamed at the end, so
    a failed job leaves no partial sample set behind and never touches an earlier one. Prompts pass
    through :func:`lorachain.embeddings.model_prompt` (the index keeps them as written); a state
    trained with embedding tuning must have its tokens loaded into `pipe`."""
    from lorachain.embeddings import check_embeddings_loaded

    check_embeddings_loaded(pipe)  # now, before anything is sampled (render_prompts checks lazily)
    jobs = [
        (index, task, prompt_index, prompt, sample)
        for index, task in tasks
        for prompt_index, prompt in prompts_of(task, config.prior_samples)
        for sample in range(config.num_samples)
    ]
    rows = []
    started = time.perf_counter()
    with staged_directory(output_dir) as staging:
        images = render_prompts(pipe, [(prompt, sample) for *_, prompt, sample in jobs], config)
        for (index, task, prompt_index, prompt, sample), image in zip(jobs, images):
            name = _image_name(index, prompt_index, sample)
            (staging / name).parent.mkdir(exist_ok=True)
            image.save(staging / name)
            rows.append(
                {
                    **identity,
                    "path": name,
                    "task": index,
                    "concept": task.concept,
                    "role": PRIOR if prompt_index == PRIOR_PROMPT_INDEX else CONCEPT,
                    "prompt_index": prompt_index,
                    "prompt": prompt,
                    "plain_prompt": task.plain_prompt(prompt),
                    "sample": sample,
                    "noise_seed": config.noise_seed,
                }
            )
        elapsed = time.perf_counter() - started
        write_index(staging / INDEX_FILE, rows)
    return {"images": len(rows), "sample_s": elapsed, "images_per_s": len(rows) / elapsed if elapsed else float("nan")}


@contextlib.contextmanager
def staged_directory(output_dir: str | Path):
    """A temporary sibling of `output_dir` to write a sample set into; it replaces `output_dir` only
    when the block ends without an error, so a failed job leaves no partial set behind and never
    touches an earlier one."""
    output_dir = Path(output_dir)
    staging = output_dir.with_name(f".{output_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    yield staging
    if output_dir.exists():
        shutil.rmtree(output_dir)
    os.replace(staging, output_dir)


@torch.no_grad()
def render_prompts(pipe, jobs: list[tuple[str, int]], config: SamplingConfig):
    """The images of (prompt, noise index) pairs, in order, batched by ``sampling.batch_size``,
    each from the paired initial noise of its index; prompts pass through
    :func:`lorachain.embeddings.model_prompt` (concept phrases -> the tokens loaded into `pipe`), and
    a state trained with embedding tuning must have its tokens loaded into `pipe`."""
    from lorachain.embeddings import check_embeddings_loaded, model_prompt
    from lorachain.models.denoisers import denoiser, family_of

    check_embeddings_loaded(pipe)
    set_scheduler(pipe, config.scheduler)
    device = device_for_sampling()
    pipe.to(device)
    family, model = family_of(pipe), denoiser(pipe)
    noises = initial_noises(config, family.latent_channels(pipe), 2 ** (len(pipe.vae.config.block_out_channels) - 1))
    with progress(len(jobs), "sampling", unit="img") as bar:  # images/s and ETA in the job's log
        for first in range(0, len(jobs), config.batch_size):
            batch = jobs[first : first + config.batch_size]
            initial = torch.stack([noises[sample] for _, sample in batch])
            latents = family.pipeline_latents(initial).to(device, model.dtype)  # FLUX: packed into tokens
            # A generator is passed for schedulers that add noise while sampling (ancestral ones);
            # the default (Euler) is deterministic given the initial latents.
            generator = torch.Generator("cpu").manual_seed(config.noise_seed + first)
            yield from pipe(
                prompt=[model_prompt(pipe, prompt) for prompt, _ in batch],
                latents=latents,
                num_inference_steps=config.steps,
                guidance_scale=config.guidance_scale,
                height=config.resolution,
                width=config.resolution,
                generator=generator,
                output_type="pil",
            ).images
            bar.update(len(batch))


def sample_compositions(pipe, compositions: dict | None, tasks: list, k: int, config, output_dir, identity):
    """Sample every composed prompt of `compositions` (config blocks, :mod:`lorachain.composition`)
    within the first k of `tasks` with the paired noises into `output_dir` (PNG + index.csv;
    written under a temporary name and renamed at the end, as the sample sets are). No composition
    applies: an index without rows. Returns timings."""
    from lorachain.composition import COMPOSITION_COLUMNS, SEPARATOR, composed_prompts, parse_compositions

    prompts = composed_prompts(parse_compositions(compositions), tasks, k)
    jobs = [(item, sample) for item in prompts for sample in range(config.num_samples)]
    rows = []
    started = time.perf_counter()
    with staged_directory(output_dir) as staging:
        images = render_prompts(pipe, [(item.prompt, sample) for item, sample in jobs], config)
        for (item, sample), image in zip(jobs, images):
            name = f"{item.composition}/g{item.label}-p{item.prompt_index}-n{sample}.png"
            (staging / name).parent.mkdir(exist_ok=True)
            image.save(staging / name)
            rows.append(
                {
                    **identity,
                    "path": name,
                    "composition": item.composition,
                    "group": item.label,
                    "placeholders": SEPARATOR.join(item.placeholders),
                    "positions": item.label,
                    "concepts": SEPARATOR.join(item.concepts),
                    "prompt_index": item.prompt_index,
                    "prompt": item.prompt,
                    "plain_prompt": item.plain_prompt,
                    "sample": sample,
                    "noise_seed": config.noise_seed,
                }
            )
        write_index(staging / INDEX_FILE, rows, COMPOSITION_COLUMNS)
    return {"composition_images": len(rows), "composition_s": time.perf_counter() - started}


def write_index(path: str | Path, rows: list[dict], columns=INDEX_COLUMNS) -> None:
    """A sample set's index (a composition sample set's: its own `columns`)."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="raise")
        writer.writeheader()
        writer.writerows(rows)


def read_index(samples_dir: str | Path):
    """The index of a samples directory as a DataFrame, with absolute image paths; checks every
    image it lists exists."""
    import pandas as pd

    samples_dir = Path(samples_dir)
    path = samples_dir / INDEX_FILE
    if not path.is_file():
        raise SamplingError(f"{path}: sample index missing; rerun the sampling job that writes {samples_dir}")
    frame = pd.read_csv(path, keep_default_na=False)
    missing_columns = sorted(set(INDEX_COLUMNS) - set(frame.columns))
    if missing_columns:
        raise SamplingError(
            f"{path}: columns {missing_columns} missing; the samples were written by another version, resample them"
        )
    frame["path"] = [str(samples_dir / name) for name in frame["path"]]
    absent = [name for name in frame["path"] if not Path(name).is_file()]
    if absent:
        raise SamplingError(
            f"{path}: {len(absent)} listed images are missing (first: {absent[0]}); resample {samples_dir}"
        )
    return frame


__all__ = [
    "CONCEPT",
    "INDEX_COLUMNS",
    "INDEX_FILE",
    "PRIOR",
    "PRIOR_PROMPT_INDEX",
    "SamplingConfig",
    "SamplingError",
    "initial_noises",
    "load_model_for_sampling",
    "read_index",
    "sample_after_task",
    "sample_base_job",
    "sample_state_job",
    "sample_tasks",
    "set_scheduler",
    "write_index",
]


def sample_after_task(
    *,
    tasks_file: str | Path,
    task_index: int | None,
    state_dir: str | Path | None,
    method_name: str | None,
    method_params: dict | None,
    sampling: dict,
    model_source: str,
    vae: str | None,
    output_dir: str | Path,
    identity: dict,
    compositions: dict | None = None,
    compositions_dir: str | Path | None = None,
) -> dict:
    """One sampling job: the state after task `task_index` of a run on tasks 1..task_index, or,
    with `task_index` None, the base model on every task of the file. With `compositions_dir`, the
    composed prompts of `compositions` (config blocks, :mod:`lorachain.composition`) whose groups
    it has learned go there too. Returns timings."""
    from lorachain.data import read_tasks

    started = time.perf_counter()
    config = SamplingConfig.from_dict(dict(sampling))
    tasks = read_tasks(tasks_file)
    last = len(tasks) if task_index is None else task_index
    if not 1 <= last <= len(tasks):
        raise SamplingError(f"{tasks_file}: task {last} requested, the file holds {len(tasks)} tasks")
    pipe = load_model_for_sampling(model_source, vae, state_dir, method_name, method_params, config.precision)
    load_s = time.perf_counter() - started
    result = sample_tasks(pipe, list(enumerate(tasks[:last], start=1)), config, output_dir, identity)
    if compositions_dir is not None:
        result |= sample_compositions(pipe, compositions, tasks, last, config, compositions_dir, identity)
    return {**result, "load_s": load_s, "total_s": time.perf_counter() - started}


def sample_state_job(
    *,
    tasks,
    task_index: int,
    state_dir,
    method: str,
    method_params: dict,
    sampling: dict,
    model: str,
    vae: str | None,
    run: dict,
    samples,
    compositions: dict | None = None,
    composition_samples=None,
) -> dict:
    """The sample_state job: the state after task `task_index` of run `run` on tasks 1..task_index,
    and the composed prompts of the groups it has learned into `composition_samples`."""
    identity = {**run, "model": run["method"], "method": method, "after_task": task_index}
    return sample_after_task(
        tasks_file=tasks,
        task_index=task_index,
        state_dir=state_dir,
        method_name=method,
        method_params=dict(method_params),
        sampling=dict(sampling),
        model_source=model,
        vae=vae,
        output_dir=samples,
        identity=identity,
        compositions=compositions,
        compositions_dir=composition_samples,
    )


def sample_base_job(
    *,
    tasks,
    sampling: dict,
    model: str,
    vae: str | None,
    domain: str,
    samples,
    compositions: dict | None = None,
    composition_samples=None,
) -> dict:
    """The sample_base job: the base model on every task of the domain's reference task file (and
    every composed prompt of its compositions into `composition_samples`)."""
    identity = {"model": "base", "method": "base", "domain": domain, "order": "", "seed": "", "after_task": 0}
    return sample_after_task(
        tasks_file=tasks,
        task_index=None,
        state_dir=None,
        method_name=None,
        method_params=None,
        sampling=dict(sampling),
        model_source=model,
        vae=vae,
        output_dir=samples,
        identity=identity,
        compositions=compositions,
        compositions_dir=composition_samples,
    )
