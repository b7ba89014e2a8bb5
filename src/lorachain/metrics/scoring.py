"""Score sample sets against their tasks' reference images (and prompts).

Every image metric is the mean cosine similarity over all (generated, reference) pairs of a task
(docs/metrics.md#pairing). Each image is embedded once per encoder; reference images once per
task and domain (``embed_references``), then reused by every scoring job.

Text alignment comes in two labelled conventions (docs/metrics.md#text-alignment): ``clip_t``, the
raw cosine with the prompt as sampled, and ``clip_score``, CLIPScore (Hessel et al. 2021:
2.5 * max(cos, 0), text "A photo depicts <prompt>" with the class word in place of the rare token),
the scale of BlockLoRA's Table 1. Prior drift (``prior_drift_<encoder>``) is 1 - the mean cosine
of each class-prompt image with the base model's image from the same noise.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from lorachain.metrics.catalog import IMAGE_METRICS, METRIC_ENCODER, PRIOR_METRICS, TEXT_METRICS, encoders_for
from lorachain.progress import progress
from lorachain.torch_env import torch

SCORE_COLUMNS = (
    "model",
    "method",
    "domain",
    "order",
    "seed",
    "after_task",
    "task",
    "concept",
    "metric",
    "score",
    "n_images",
    "n_references",
)


CLIPSCORE_PREFIX = "A photo depicts"
CLIPSCORE_WEIGHT = 2.5


class ScoreError(RuntimeError):
    """A score that cannot be computed or is not finite; names the file."""


def metric_union(metrics: list | dict) -> list[str]:
    """Every metric of `metrics`: one list for all tasks, or task position ("1".."N") -> list (a
    mixed concept set, each concept scored by its own domain's metrics)."""
    if isinstance(metrics, dict):
        return list(dict.fromkeys(metric for listed in metrics.values() for metric in listed))
    return list(metrics)


def metrics_of_task(metrics: list | dict, task: int, source: str = "") -> list[str]:
    if not isinstance(metrics, dict):
        return list(metrics)
    if str(task) not in metrics:
        raise ScoreError(f"{source}: task {task} has no metrics (the set's metrics cover tasks {sorted(metrics)})")
    return list(metrics[str(task)])


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def mean_pairwise_cosine(generated: torch.Tensor, references: torch.Tensor) -> float:
    """Mean over all (generated, reference) pairs of the cosine similarity of their embeddings."""
    if len(generated) == 0 or len(references) == 0:
        raise ScoreError(f"all-pairs cosine of {len(generated)} generated and {len(references)} reference embeddings")
    return float((_normalise(generated) @ _normalise(references).T).mean())


def mean_matched_cosine(images: torch.Tensor, texts: torch.Tensor) -> float:
    """Mean cosine between each image and its own text (row i with row i): CLIP-T."""
    if images.shape != texts.shape or len(images) == 0:
        raise ScoreError(
            f"matched cosine needs equal, non-empty shapes; got {tuple(images.shape)} and {tuple(texts.shape)}"
        )
    return float((_normalise(images) * _normalise(texts)).sum(-1).mean())


def _open_images(paths: list[str]):
    from PIL import Image

    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (OSError, ValueError) as error:
            raise ScoreError(f"{path}: cannot read image ({error})") from None
    return images


def embed_references(tasks, encoders: dict, metrics: list[str], output: str | Path, batch_size: int = 32) -> dict:
    """Embed every task's reference images once per image-metric encoder; write them as one
    safetensors file (key ``{encoder}/{concept}``) with the reference paths in its metadata."""
    from safetensors.torch import save_file

    tensors, sources = {}, {}
    for position, task in enumerate(tasks, start=1):
        image_encoders = encoders_for([m for m in metrics_of_task(metrics, position) if m in IMAGE_METRICS])
        if not task.reference_images:
            raise ScoreError(
                f"task {task.concept}: no reference images; the dataset's reference directory for it is empty"
            )
        images = _open_images(list(task.reference_images))
        sources[task.concept] = list(task.reference_images)
        for name in image_encoders:
            tensors[f"{name}/{task.concept}"] = encoders[name].embed_images(images, batch_size=batch_size).contiguous()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(output), metadata={"references": json.dumps(sources)})
    return {"concepts": len(tasks), "encoders": encoders_for([m for m in metric_union(metrics) if m in IMAGE_METRICS])}


def load_references(path: str | Path) -> dict:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise ScoreError(f"{path}: reference embeddings missing; rerun the embed_references job")
    return load_file(str(path))


def clip_score(images: torch.Tensor, texts: torch.Tensor) -> float:
    """CLIPScore (Hessel et al. 2021): mean over images of 2.5 * max(cos(image, its text), 0)."""
    if images.shape != texts.shape or len(images) == 0:
        raise ScoreError(f"CLIPScore needs equal, non-empty shapes; got {tuple(images.shape)} and {tuple(texts.shape)}")
    cosines = (_normalise(images) * _normalise(texts)).sum(-1)
    return float((CLIPSCORE_WEIGHT * cosines.clamp(min=0)).mean())


def paired_drift(generated: torch.Tensor, base: torch.Tensor) -> float:
    """Prior drift: 1 - mean cosine of row i of `generated` with row i of `base` (the base model's
    image from the same initial noise); 0 when the images embed identically."""
    if generated.shape != base.shape or len(generated) == 0:
        raise ScoreError(
            f"prior drift pairs images by noise; got {tuple(generated.shape)} and {tuple(base.shape)} embeddings"
        )
    return float(1.0 - (_normalise(generated) * _normalise(base)).sum(-1).mean())


def clipscore_text(plain_prompt: str) -> str:
    return f"{CLIPSCORE_PREFIX} {plain_prompt}"


def _embed_texts(frame, metrics, encoders, batch_size) -> dict:
    """Text embedding of every prompt the text metrics read: the prompt (clip_t) and the
    CLIPScore text of its plain form (clip_score)."""
    texts = set()
    if "clip_t" in metrics:
        texts |= set(frame["prompt"])
    if "clip_score" in metrics:
        texts |= {clipscore_text(prompt) for prompt in frame["plain_prompt"]}
    texts = sorted(texts)
    return dict(zip(texts, encoders["clip"].embed_texts(texts, batch_size=batch_size))) if texts else {}


def _text_score(metric, generated, group, text) -> float:
    """clip_t or clip_score of the images of `group` (index rows) with their own prompts."""
    if metric == "clip_t":
        return mean_matched_cosine(generated, torch.stack([text[p] for p in group["prompt"]]))
    return clip_score(generated, torch.stack([text[clipscore_text(p)] for p in group["plain_prompt"]]))


def _reference_score(metric, generated, concept, references, source) -> tuple[float, int]:
    """An image metric of the images against `concept`'s reference embeddings (and their count)."""
    key = f"{METRIC_ENCODER[metric]}/{concept}"
    if key not in references:
        raise ScoreError(
            f"{source}: no reference embeddings {key!r}; "
            "the references were embedded for other tasks or metrics, rerun embed_references"
        )
    return mean_pairwise_cosine(generated, references[key]), len(references[key])


def _concept_score(metric, generated, group, text, references, source) -> tuple[float, int]:
    if metric in TEXT_METRICS:
        return _text_score(metric, generated, group, text), 0
    return _reference_score(metric, generated, group.iloc[0]["concept"], references, source)


def _prior_score(metric, generated, group, base_priors, source) -> tuple[float, int]:
    concept = group.iloc[0]["concept"]
    key = f"{METRIC_ENCODER[metric]}/{concept}"
    if base_priors is None or key not in base_priors:
        raise ScoreError(
            f"{source}: {metric} needs the base model's class-prompt images of {concept!r}; "
            "sample the base model with sampling.prior_samples: true"
        )
    samples, base = base_priors[key]
    position = {sample: row for row, sample in enumerate(samples)}
    missing = sorted(set(group["sample"]) - set(position))
    if missing:
        raise ScoreError(f"{source}: the base model has no class-prompt image of {concept!r} for noises {missing}")
    return paired_drift(generated, base[[position[sample] for sample in group["sample"]]]), len(group)


def _scored_with_progress(frames: list, sources: list, desc: str):
    """(frame, source) pairs; as each sample set is scored, images/s and an ETA go to the job's log."""
    with progress(sum(len(frame) for frame in frames), desc, unit="img") as bar:
        for frame, source in zip(frames, sources):
            yield frame, source
            bar.update(len(frame))


def score_sample_sets(
    frames: list,
    references: dict,
    encoders: dict,
    metrics: list[str],
    sources: list[str],
    batch_size: int = 32,
    base_priors: dict | None = None,
) -> list[dict]:
    """Rows of scores (one per sample set, task and metric) for sample-set index frames (see
    lorachain.sample.read_index); `sources` names each frame's index file for errors. Concept
    metrics read the concept images; prior-drift metrics the class-prompt images (role ``prior``)
    against `base_priors` (:func:`base_prior_embeddings`)."""
    from lorachain.sample import PRIOR

    every = metric_union(metrics)
    rows = []
    for frame, source in _scored_with_progress(frames, sources, "scoring"):
        frame = frame.reset_index(drop=True)  # row i <-> embedding i
        images = _open_images(list(frame["path"]))
        embeddings = {name: encoders[name].embed_images(images, batch_size=batch_size) for name in encoders_for(every)}
        text = _embed_texts(
            frame[frame["role"] != PRIOR], [m for m in every if m not in PRIOR_METRICS], encoders, batch_size
        )
        for role in (None, PRIOR):
            part = frame[frame["role"] == PRIOR] if role == PRIOR else frame[frame["role"] != PRIOR]
            wanted = [m for m in every if (m in PRIOR_METRICS) == (role == PRIOR)]
            if wanted and part.empty:
                raise ScoreError(
                    f"{source}: no {'class-prompt' if role else 'concept'} images for {wanted}; "
                    + ("resample with sampling.prior_samples: true" if role else "resample")
                )
            for (after, task, concept), group in part.groupby(["after_task", "task", "concept"], sort=True):
                positions = torch.as_tensor(group.index.to_list())
                task_metrics = metrics_of_task(metrics, int(task), source)
                for metric in [m for m in task_metrics if (m in PRIOR_METRICS) == (role == PRIOR)]:
                    generated = embeddings[METRIC_ENCODER[metric]][positions]
                    if role == PRIOR:
                        value, n_references = _prior_score(metric, generated, group, base_priors, source)
                    else:
                        value, n_references = _concept_score(metric, generated, group, text, references, source)
                    if not math.isfinite(value):
                        raise ScoreError(
                            f"{source}: {metric} on task {task} after task {after} is {value}; "
                            "check the images and the metric model"
                        )
                    rows.append(
                        _score_row(group.iloc[0], after, task, concept, metric, value, len(group), n_references)
                    )
    return sorted(rows, key=lambda row: (row["after_task"], row["task"], every.index(row["metric"])))


def _score_row(first, after, task, concept, metric, value, n_images, n_references) -> dict:
    return {
        "model": first["model"],
        "method": first["method"],
        "domain": first["domain"],
        "order": first["order"],
        "seed": first["seed"],
        "after_task": int(after),
        "task": int(task),
        "concept": concept,
        "metric": metric,
        "score": value,
        "n_images": n_images,
        "n_references": n_references,
    }


def member_metrics(metrics: list | dict, position: int, source: str) -> list[str]:
    """The image metrics that score the member at `position` (its own domain's)."""
    return [metric for metric in metrics_of_task(metrics, position, source) if metric in IMAGE_METRICS]


def score_compositions(frames: list, references: dict, encoders: dict, metrics, sources: list, batch_size=32) -> list:
    """Score rows of composition sample sets: for every (state, composition, group, prompt) each
    member by its image metrics against its own references, and the text metrics on the prompt.
    ``metrics``: one list, or position -> list for a mixed set (as the concept scores take)."""
    from lorachain.composition import SEPARATOR, WHOLE_PROMPT

    every = metric_union(metrics)
    text_metrics = [metric for metric in every if metric in TEXT_METRICS]
    needed = encoders_for([m for m in every if m in TEXT_METRICS or m in IMAGE_METRICS])
    rows = []
    for frame, source in _scored_with_progress(frames, sources, "scoring compositions"):
        if frame.empty:
            continue
        frame = frame.reset_index(drop=True)
        images = _open_images(list(frame["path"]))
        embeddings = {name: encoders[name].embed_images(images, batch_size=batch_size) for name in needed}
        text = _embed_texts(frame, text_metrics, encoders, batch_size)
        keys = ["after_task", "composition", "group", "prompt_index"]
        for (after, composition, group, prompt_index), part in frame.groupby(keys, sort=True):
            first = part.iloc[0]
            positions = torch.as_tensor(part.index.to_list())
            base = {key: first[key] for key in ("model", "method", "domain", "order", "seed")}
            base.update(after_task=int(after), composition=composition, group=group, prompt_index=int(prompt_index))
            members = zip(first["placeholders"].split(SEPARATOR), first["positions"].split(SEPARATOR))
            for (member, position), concept in zip(members, first["concepts"].split(SEPARATOR)):
                for metric in member_metrics(metrics, int(position), source):
                    generated = embeddings[METRIC_ENCODER[metric]][positions]
                    value, _ = _reference_score(metric, generated, concept, references, source)
                    rows.append(_composition_row(base, member, int(position), concept, metric, value, len(part)))
            for metric in text_metrics:
                value = _text_score(metric, embeddings["clip"][positions], part, text)
                rows.append(_composition_row(base, WHOLE_PROMPT, 0, "", metric, value, len(part)))
    return rows


def _composition_row(
    base: dict, member: str, position: int, concept: str, metric: str, value: float, n_images: int
) -> dict:
    return {**base, "member": member, "position": position, "concept": concept, "metric": metric, "score": value,
            "n_images": n_images}  # fmt: skip


def base_prior_embeddings(base_frame, encoders: dict, metrics: list[str], batch_size: int = 32) -> dict:
    """``{encoder}/{concept}`` -> (noise indices, embeddings) of the base model's class-prompt
    images, for the prior-drift metrics of `metrics`."""
    from lorachain.sample import PRIOR

    names = encoders_for([metric for metric in metric_union(metrics) if metric in PRIOR_METRICS])
    priors = base_frame[base_frame["role"] == PRIOR].sort_values(["concept", "sample"])
    result = {}
    for concept, group in priors.groupby("concept", sort=True):
        images = _open_images(list(group["path"]))
        for name in names:
            result[f"{name}/{concept}"] = (list(group["sample"]), encoders[name].embed_images(images, batch_size))
    return result


def load_encoders(metrics: list[str], blocks: dict, device=None) -> tuple[dict, float]:
    """Every encoder the metrics need, loaded once; returns them and the seconds loading took."""
    from lorachain.metrics.encoders import load_encoder

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    encoders = {name: load_encoder(name, blocks[name], device=device) for name in encoders_for(metrics)}
    return encoders, time.perf_counter() - started


def write_scores(rows: list[dict], output: str | Path) -> None:
    import pandas as pd

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(f".{output.name}.tmp")
    pd.DataFrame(rows, columns=list(SCORE_COLUMNS)).to_csv(temporary, index=False, float_format="%.6f")
    temporary.replace(output)


def read_scores(path: str | Path):
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise ScoreError(f"{path}: scores missing; rerun the scoring job that writes it")
    frame = pd.read_csv(path)
    missing = sorted(set(SCORE_COLUMNS) - set(frame.columns))
    if missing:
        raise ScoreError(f"{path}: columns {missing} missing; rescore")
    if not frame["score"].map(math.isfinite).all():
        bad = frame[~frame["score"].map(math.isfinite)].iloc[0]
        raise ScoreError(
            f"{path}: {bad['metric']} on task {bad['task']} after task {bad['after_task']} is {bad['score']}"
        )
    return frame


def embed_references_job(*, tasks, metrics: list | dict, encoders: dict, batch_size: int, references) -> dict:
    """The embed_references job: reference embeddings of every task of the task file `tasks`, with
    the encoders of the loader blocks `encoders`, written to `references`."""
    from lorachain.data import read_tasks

    started = time.perf_counter()
    task_list = read_tasks(tasks)
    loaded, load_s = load_encoders([m for m in metric_union(metrics) if m in IMAGE_METRICS], encoders)
    result = embed_references(task_list, loaded, metrics, references, batch_size=batch_size)
    return {**result, "load_s": load_s, "total_s": time.perf_counter() - started}


def score_samples(
    *,
    sample_dirs: list,
    references,
    metrics: list[str],
    encoder_blocks: dict,
    batch_size: int,
    output,
    base_samples=None,
    composition_dirs=None,
    composition_output=None,
) -> dict:
    """What the scoring jobs share: the sample sets `sample_dirs`, one scores CSV; the prior-drift
    metrics compare with the base model's sample set `base_samples`. With `composition_output`, the
    composition sample sets `composition_dirs` are scored with the same encoders into that CSV
    (:func:`score_compositions`). Returns timings, including the share of the
    job spent loading the embedding models."""
    from lorachain.sample import INDEX_FILE, read_index

    started = time.perf_counter()
    frames = [read_index(directory) for directory in sample_dirs]
    reference_embeddings = load_references(references)
    encoders, load_s = load_encoders(metric_union(metrics), encoder_blocks)
    score_started = time.perf_counter()
    base_priors = None
    if base_samples is not None and any(metric in PRIOR_METRICS for metric in metric_union(metrics)):
        base_priors = base_prior_embeddings(read_index(base_samples), encoders, metrics, batch_size)
    rows = score_sample_sets(
        frames,
        reference_embeddings,
        encoders,
        metrics,
        [str(Path(d) / INDEX_FILE) for d in sample_dirs],
        batch_size,
        base_priors,
    )
    write_scores(rows, output)
    if composition_output is not None:
        from lorachain.composition import read_composition_index, write_composition_scores

        composed = [read_composition_index(directory) for directory in composition_dirs or []]
        sources = [str(Path(d) / INDEX_FILE) for d in composition_dirs or []]
        write_composition_scores(
            score_compositions(composed, reference_embeddings, encoders, metrics, sources, batch_size),
            composition_output,
        )
        frames += composed
    score_s = time.perf_counter() - score_started
    total_s = time.perf_counter() - started
    images = sum(len(frame) for frame in frames)
    return {
        "images": images,
        "rows": len(rows),
        "load_models_s": load_s,
        "score_s": score_s,
        "total_s": total_s,
        "images_per_s": images / score_s if score_s else math.nan,
        "load_share": load_s / total_s,
    }


def _sample_dirs(samples) -> list:
    return [samples] if isinstance(samples, (str, Path)) else list(samples)


def score_job(
    *,
    samples,
    references,
    metrics: list | dict,
    encoders: dict,
    batch_size: int,
    scores,
    base_samples=None,
    compositions=None,
    composition_scores=None,
) -> dict:
    """The score_run, score_base and score_merges jobs (one scores CSV of the sample sets
    `samples`): every sample set of one run (after task 1..T), the base model's sample set of a
    domain, or the sample sets of one merge label (one per merge size k). `base_samples` is the
    base model's sample set (the prior-drift reference; score_base scores against its own);
    `compositions` the matching composition sample sets, scored into `composition_scores`."""
    return score_samples(
        sample_dirs=_sample_dirs(samples),
        references=references,
        metrics=metrics,
        encoder_blocks=encoders,
        batch_size=batch_size,
        output=scores,
        base_samples=base_samples,
        composition_dirs=None if compositions is None else _sample_dirs(compositions),
        composition_output=composition_scores,
    )


# The three scoring rules differ only in which sample sets they read.
score_run_job = score_base_job = score_merges_job = score_job
