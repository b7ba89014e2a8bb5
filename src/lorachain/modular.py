"""The modular regime (BlockLoRA's setting): concepts trained independently, merged instantly.

Every concept of a domain is trained from the base model on its own (a task-1 state of
:mod:`lorachain.train`, with the concept's index as its slot). A merge method
(:mod:`lorachain.merging`) then combines the LoRAs of the first k concepts into one delta, which
is added to the base U-Net and sampled on the k concepts with the continual regime's sampler, so
the same metrics score both regimes. What the workflow's jobs call:

* :func:`record_layer_inputs`: gradient fusion's data. The concept's own model (base + its LoRA),
  conditioned on the concept's training prompt, runs on one of two sources, and the Gram matrix
  X^T X of every targeted layer's inputs is accumulated (Mix-of-Show records the inputs of each
  concept's model on that concept's data and fits the fused layer to reproduce its outputs there):
  ``images`` (this project's default): it denoises the concept's training images (one fixed crop
  each, their VAE posterior means) at ``timesteps`` evenly spaced noise levels with one seeded
  noise draw each; ``sampling`` (Mix-of-Show): it samples one image of the prompt from seeded noise
  in ``timesteps`` steps of the pipeline's scheduler, without guidance as Mix-of-Show's recorder
  does, and every step is recorded. ``cross_attention_rows: concept`` keeps, in the cross-attention
  K/V layers (whose inputs are the text encoder's token features), only the rows of the concept's
  own tokens ("sks dog", or the style's phrase) instead of all 77.
* :func:`merge_and_sample`: load the k concept states, merge them (timed), sample them on the
  modular regime's prompts (:func:`modular_tasks`: BlockLoRA's 20 per concept by default).

The rules' entry points are :func:`train_concept_job` (the trainer's path shared with the
``train_task`` rule), :func:`record_layer_inputs_job` and :func:`merge_and_sample_job`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lorachain import provenance
from lorachain.torch_env import torch


class ModularError(ValueError):
    """A modular-regime input that cannot be used; the message names the file or config key."""


def concept_seed(seed: int, concept_index: int) -> int:
    """Each independently trained concept gets its own seed (its own initial LoRA and data draws),
    by the trainer's rule for the tasks of a run (whatever training.seed_policy says)."""
    from lorachain.training.config import derived_seed

    return derived_seed(seed, concept_index)


def load_concept(state_dir: str | Path, *, with_grams: str | Path | None = None):
    """A trained concept state as a :class:`lorachain.merging.Concept` (slot from its manifest).
    A concept trained with embedding tuning has its embeddings file checked against its manifest
    here too; they are loaded into a pipeline with :func:`lorachain.embeddings.load_state_embeddings`."""
    from lorachain.lora import Concept
    from lorachain.merging.fusion import load_grams
    from lorachain.state import STATE_FILE, load_adapters, read_manifest, read_state_embeddings

    manifest = read_manifest(state_dir)
    if manifest["task_index"] != 1 or manifest.get("parent"):
        raise ModularError(
            f"{Path(state_dir) / STATE_FILE}: not an independently trained concept "
            f"(task {manifest['task_index']} of a chain)"
        )
    read_state_embeddings(state_dir, manifest)  # checked now, not when a merge samples
    return Concept(
        name=str(state_dir),
        adapters=load_adapters(state_dir, manifest),
        slot=manifest.get("slot", 0),
        grams=None if with_grams is None else load_grams(with_grams),
    ), manifest


def concept_token_mask(tokenizer, prompt: str, phrase: str) -> torch.Tensor:
    """(1, tokens) boolean mask of where `phrase`'s tokens sit in `prompt` as the pipeline encodes
    it (padded to the tokenizer's length). An error names the prompt when the phrase is not in it.
    A concept token loaded into the tokenizer ("<sks>" in "a <sks> sneaker") counts with all its
    vectors' tokens, as the pipeline expands it."""
    from lorachain.embeddings import expand_tokens

    prompt, phrase = expand_tokens(prompt, tokenizer), expand_tokens(phrase, tokenizer)
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    phrase_ids = tokenizer(phrase, add_special_tokens=False).input_ids
    width = len(phrase_ids)
    for start in range(len(ids) - width + 1):
        if width and ids[start : start + width] == phrase_ids:
            mask = torch.zeros(1, len(ids), dtype=torch.bool)
            mask[0, start : start + width] = True
            return mask
    raise ModularError(f"the concept phrase {phrase!r} is not among the tokens of its prompt {prompt!r}")


def _record_on_images(
    pipe, task, condition, recorder, mask, *, resolution, timesteps, generator, device, guidance
) -> None:
    from lorachain.models.denoisers import denoiser, family_of
    from lorachain.training.conditioning import load_training_image, sdxl_time_ids
    from lorachain.training.config import FlowMatchingConfig
    from lorachain.training.objective import objective_of

    family, model = family_of(pipe), denoiser(pipe)
    objective = objective_of(family, pipe.scheduler.config, FlowMatchingConfig())
    images = [load_training_image(path, resolution, generator) for path in task.train_images]
    pixels = torch.stack([image for image, _, _ in images]).to(device)
    latents = family.scaled_latents(pipe.vae.encode(pixels).latent_dist.mean.float())
    time_ids = sdxl_time_ids(condition, images, resolution, device)
    levels = torch.linspace(0, objective.levels - 1, timesteps).round().long()
    recorder.context_rows = None if mask is None else mask.expand(len(latents), -1)
    for level in levels:
        noise = torch.randn(latents.shape, generator=generator).to(device)
        noisy, t = objective.noisy_at(latents, noise, int(level))
        family.forward(model, noisy, t.to(device), condition, time_ids, model.dtype, guidance)


def _record_on_trajectory(
    pipe, task, condition, recorder, mask, *, resolution, timesteps, generator, device, guidance
) -> None:
    from lorachain.models.denoisers import denoiser, family_of
    from lorachain.training.conditioning import sdxl_time_ids

    family, model = family_of(pipe), denoiser(pipe)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    size = resolution // pipe.vae_scale_factor
    if family.flow_matching:  # FLUX's dynamic shift depends on the token count, as its pipeline sets it
        _set_flow_timesteps(pipe, scheduler, timesteps, size, device)
    else:
        scheduler.set_timesteps(timesteps, device=device)
    shape = (1, family.latent_channels(pipe), size, size)
    # Flow matching starts from the noise itself (sigma 1): its schedulers have no init_noise_sigma.
    latents = torch.randn(shape, generator=generator).to(device) * getattr(scheduler, "init_noise_sigma", 1.0)
    time_ids = sdxl_time_ids(condition, [(None, (resolution, resolution), (0, 0))], resolution, device)
    recorder.context_rows = mask
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
        step_t = t.reshape(1).to(device)
        prediction = family.forward(model, model_input, step_t, condition, time_ids, model.dtype, guidance)
        latents = scheduler.step(prediction.float(), t, latents).prev_sample


def _set_flow_timesteps(pipe, scheduler, steps: int, size: int, device) -> None:
    """The flow-matching schedule the pipeline would sample with (FLUX shifts it by the image's
    token count: diffusers' calculate_shift)."""
    if not scheduler.config.get("use_dynamic_shifting", False):
        scheduler.set_timesteps(steps, device=device)
        return
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    tokens = (size // 2) * (size // 2)
    config = scheduler.config
    mu = calculate_shift(
        tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift
    )
    sigmas = torch.linspace(1.0, 1 / steps, steps).tolist()
    scheduler.set_timesteps(sigmas=sigmas, mu=mu, device=device)


RECORDERS = {"images": _record_on_images, "sampling": _record_on_trajectory}


@torch.no_grad()
def record_layer_inputs(
    *,
    model_source: str,
    vae: str | None,
    state_dir: str | Path,
    method_name: str,
    method_params: dict,
    task,
    target_modules,
    resolution: int,
    timesteps: int,
    seed: int,
    output: str | Path,
    gram_dtype: str = "float32",
    recording: str = "images",
    record: str | Path | None = None,
) -> dict:
    """Record the Gram matrices of the targeted layers' inputs of one concept's model as
    `recording` says (see the module docstring and :func:`lorachain.merging.fusion.recording_name`)
    and write them with :func:`lorachain.merging.fusion.save_grams`; what was recorded and its
    timings go to `record` (JSON) too. Returns the timings.

    A concept trained with embedding tuning is recorded with its embeddings loaded and its training
    prompt rewritten to its token (:func:`lorachain.embeddings.model_prompt`); the concept rows are
    then its token's."""
    from lorachain.embeddings import check_embeddings_loaded, load_state_embeddings, model_prompt
    from lorachain.merging.fusion import GramRecorder, is_cross_attention_kv, parse_recording, save_grams
    from lorachain.methods import make_method
    from lorachain.models.denoisers import denoiser, family_of
    from lorachain.models.loading import load_pipeline
    from lorachain.sample import device_for_sampling
    from lorachain.state import apply_to_unet, fold_state, read_manifest
    from lorachain.training.adapters import lora_layers
    from lorachain.training.conditioning import encode_condition

    started = time.perf_counter()
    source, rows = parse_recording(recording)
    device = device_for_sampling()
    pipe = load_pipeline(model_source, vae=vae)
    state = fold_state(state_dir, make_method(method_name, method_params))
    apply_to_unet(denoiser(pipe), state)
    if state.embeddings:
        load_state_embeddings(pipe, [state_dir])
    check_embeddings_loaded(pipe)
    pipe.to(device)
    generator = torch.Generator().manual_seed(seed)
    prompt, identifier = model_prompt(pipe, task.train_prompt), model_prompt(pipe, task.identifier)
    condition = encode_condition(pipe, prompt, device)
    family, model = family_of(pipe), denoiser(pipe)
    layers = list(lora_layers(model, target_modules))
    if rows == "concept" and family.name != "unet":
        raise ModularError(
            f"gradient fusion's concept rows are the U-Net's cross-attention keys and values at the concept's "
            f"tokens; a {family.name.upper()} transformer has joint attention instead: record it with rows: all "
            "(the merge's recording key)"
        )
    mask = concept_token_mask(pipe.tokenizer, prompt, identifier) if rows == "concept" else None
    context = [layer for layer in layers if is_cross_attention_kv(layer)] if mask is not None else []
    load_s = time.perf_counter() - started
    with GramRecorder(model, layers, context_layers=context) as recorder:
        RECORDERS[source](
            pipe,
            task,
            condition,
            recorder,
            mask,
            resolution=resolution,
            timesteps=timesteps,
            generator=generator,
            device=device,
            guidance=read_manifest(state_dir).get("guidance"),  # FLUX.1-dev: the concept's training guidance
        )
    if recorder.unseen:
        raise ModularError(
            f"{state_dir}: layers {recorder.unseen[:3]} received no input while recording; "
            "check training.target_modules"
        )
    save_grams(output, recorder.grams, dtype=getattr(torch, gram_dtype))
    result = {
        "recording": recording,
        "source": source,
        "cross_attention_rows": rows,
        "layers": len(layers),
        "restricted_layers": len(context),
        "rows_per_layer_max": max(n for _, n in recorder.grams.values()),
        "load_s": load_s,
        "total_s": time.perf_counter() - started,
    }
    if record is not None:
        Path(record).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result


def modular_tasks(tasks, eval_prompts: dict | None) -> list:
    """The tasks with the modular regime's evaluation prompts: ``modular.eval_prompts.<kind>``
    templates where the config gives them, BlockLoRA's 20 per concept otherwise (see
    :data:`lorachain.data.selection.BLOCKLORA_OBJECT_TEMPLATES`)."""
    from lorachain.data.selection import BLOCKLORA_OBJECT_TEMPLATES, BLOCKLORA_STYLE_TEMPLATES

    templates = {"object": BLOCKLORA_OBJECT_TEMPLATES, "style": BLOCKLORA_STYLE_TEMPLATES, **(eval_prompts or {})}
    for kind, given in templates.items():
        bad = [template for template in given if template.count("{}") != 1]
        if bad:
            raise ModularError(
                f"config key modular.eval_prompts.{kind}: {bad[0]!r} "
                "must hold the concept placeholder {} exactly once"
            )
    return [task.with_templates(templates[task.kind]) for task in tasks]


def merge_and_sample(
    *,
    concept_dirs: list,
    gram_files: list | None,
    merge_name: str,
    merge_params: dict,
    merge_key: str,
    tasks_file: str | Path,
    sampling: dict,
    model_source: str,
    vae: str | None,
    output_dir: str | Path,
    identity: dict,
    merge_record: str | Path,
    eval_prompts: dict | None = None,
    gram_records: list | None = None,
    compositions: dict | None = None,
    compositions_dir: str | Path | None = None,
) -> dict:
    """Merge the first k concepts (k = len(concept_dirs)) and sample the merged model on them
    (and, with `compositions_dir`, on the composed prompts of `compositions` within those k).
    Writes the sample set (PNG + index.csv) to `output_dir` and the merge time and what was merged
    to `merge_record` (JSON). The merge is timed alone: reading the LoRA files is not part of it.
    A merge on recorded layer inputs also records ``record_s``, the k concepts' recording jobs'
    time (from `gram_records`, the records beside the gram files), so the merge's cost can be
    given with and without recording."""
    from lorachain.data import read_tasks
    from lorachain.embeddings import load_state_embeddings
    from lorachain.methods import make_merge
    from lorachain.models.denoisers import denoiser
    from lorachain.sample import SamplingConfig, load_model_for_sampling, sample_compositions, sample_tasks
    from lorachain.state import FoldedState, apply_to_unet

    started = time.perf_counter()
    if not concept_dirs:
        raise ModularError(f"{merge_key}: a merge of zero concepts; merge_sizes must be >= 1")
    tasks = modular_tasks(read_tasks(tasks_file), eval_prompts)
    k = len(concept_dirs)
    if k > len(tasks):
        raise ModularError(f"{tasks_file}: {k} concepts merged but the file holds {len(tasks)} tasks")
    method = make_merge(merge_name, merge_params, key=merge_key)
    grams = gram_files if method.needs_layer_inputs else [None] * k
    if method.needs_layer_inputs and (gram_files is None or len(gram_files) != k):
        raise ModularError(f"{merge_key}: merge {merge_name!r} needs recorded layer inputs of all {k} concepts")
    record_s = _recording_time(gram_records, method, merge_key) if method.needs_layer_inputs else None
    loaded = [load_concept(directory, with_grams=gram) for directory, gram in zip(concept_dirs, grams)]
    for position, (concept, manifest) in enumerate(loaded):
        if manifest.get("concept") != tasks[position].concept:
            raise ModularError(
                f"{concept.name}: trained on concept {manifest.get('concept')!r}, "
                f"but task {position + 1} of {tasks_file} is {tasks[position].concept!r}"
            )
    concepts = [concept for concept, _ in loaded]
    read_s = time.perf_counter() - started
    method.load_dependencies()
    merge_started = time.perf_counter()
    delta = method.merge(concepts)
    merge_s = time.perf_counter() - merge_started
    del concepts

    config = SamplingConfig.from_dict(dict(sampling))
    pipe = load_model_for_sampling(model_source, vae, None, None, None, config.precision)
    for concept, manifest in loaded:
        if manifest.get("architecture") != type(pipe).__name__ or manifest.get("base_model") != str(model_source):
            raise ModularError(
                f"{concept.name}: trained on {manifest.get('base_model')!r} ({manifest.get('architecture')}), "
                f"not on {str(model_source)!r} ({type(pipe).__name__}); merge LoRAs of the base model being sampled"
            )
    del loaded
    apply_to_unet(denoiser(pipe), FoldedState(tasks_done=k, merged=delta))
    del delta
    load_state_embeddings(pipe, concept_dirs)  # the concepts' tokens, where trained with embedding tuning
    result = sample_tasks(pipe, list(enumerate(tasks[:k], start=1)), config, output_dir, identity)
    if compositions_dir is not None:
        result |= sample_compositions(pipe, compositions, tasks, k, config, compositions_dir, identity)
    record = {
        "merge": identity.get("method"),
        "method": merge_name,
        "params": method.params,
        "k": k,
        "merge_type": "post-training (closed form)" if method.needs_layer_inputs else "instant",
        "merge_s": merge_s,
        "record_s": record_s,
        "read_s": read_s,
        "concepts": [str(d) for d in concept_dirs],
        "provenance": provenance.record(model_source),
    }
    Path(merge_record).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return {**result, "merge_s": merge_s, "read_s": read_s, "total_s": time.perf_counter() - started}


def _recording_time(gram_records: list | None, method, merge_key: str) -> float | None:
    """The summed recording time of the merged concepts' gram files, after checking that they were
    recorded the way the merge asks; None when no records are given (a merge run outside the workflow)."""
    if not gram_records:
        return None
    expected = method.layer_input_recording(method.params)
    total = 0.0
    for path in gram_records:
        record = json.loads(Path(path).read_text())
        if record.get("recording") != expected:
            raise ModularError(
                f"{path}: layer inputs recorded as {record.get('recording')!r}, but {merge_key} asks for {expected!r}"
            )
        total += float(record["total_s"])
    return total


# ------------------------------------------------------------------------------ jobs


def train_concept_job(
    *,
    tasks,
    concept_index: int,
    method: str,
    method_params: dict,
    training: dict,
    checkpoint_every: int,
    model: str,
    vae: str | None,
    seed: int,
    run: dict,
    state,
    lora,
    loss,
    class_images=None,
    tracking: dict | None = None,
    tracking_dir=None,
) -> dict:
    """The train_concept job: concept `concept_index` (1-based) of the domain's reference task file,
    trained from the base model independently of the other concepts (task 1 of its own chain, slot
    concept_index - 1, seed :func:`concept_seed`)."""
    from lorachain.train import train_task_from_file

    return train_task_from_file(
        tasks=tasks,
        position=concept_index,
        task_index=1,
        previous_state=None,
        slot=concept_index - 1,
        seed=concept_seed(seed, concept_index),
        method=method,
        method_params=method_params,
        training=training,
        checkpoint_every=checkpoint_every,
        model=model,
        vae=vae,
        run=run,
        state=state,
        lora=lora,
        loss=loss,
        class_images=class_images or None,
        tracking=tracking,
        tracking_dir=tracking_dir,
    )


def record_layer_inputs_job(
    *,
    tasks,
    state,
    concept_index: int,
    method: str,
    method_params: dict,
    layer_inputs: dict,
    recording: str,
    target_modules: list | str,
    resolution: int,
    model: str,
    vae: str | None,
    grams,
    record,
) -> dict:
    """The record_layer_inputs job: the Gram matrices of the concept whose manifest is `state`, on
    concept `concept_index` of the task file `tasks`, recorded as `recording` says
    (``modular.layer_inputs`` sets timesteps, seed and the stored dtype)."""
    from lorachain.data import read_tasks

    block = dict(layer_inputs)
    return record_layer_inputs(
        model_source=model,
        vae=vae,
        state_dir=Path(state).parent,
        method_name=method,
        method_params=dict(method_params),
        task=read_tasks(tasks)[concept_index - 1],
        # a regex (a string, peft's semantics) as given; suffixes as a list; None: the family's defaults
        target_modules=target_modules
        if target_modules is None or isinstance(target_modules, str)
        else list(target_modules),
        resolution=resolution,
        timesteps=block.get("timesteps", 10),
        seed=block.get("seed", 0),
        gram_dtype=block.get("gram_dtype", "float32"),
        recording=recording,
        output=grams,
        record=record,
    )


def merge_and_sample_job(
    *,
    tasks,
    grams: list,
    method: str,
    merge_params: dict,
    concept_dirs: list,
    sampling: dict,
    model: str,
    vae: str | None,
    identity: dict,
    merge: str,
    samples,
    record,
    eval_prompts: dict | None = None,
    recordings: list | None = None,
    compositions: dict | None = None,
    composition_samples=None,
) -> dict:
    """The merge_and_sample job: merge label `merge` (merge method `method`) of the concepts in
    `concept_dirs`, sampled into `samples` (and its composed prompts into `composition_samples`);
    the merge's time, its concepts' recording time and its inputs go to `record`."""
    return merge_and_sample(
        concept_dirs=list(concept_dirs),
        gram_files=list(grams) or None,
        merge_name=method,
        merge_params=dict(merge_params),
        merge_key=f"modular.merges.{merge}",
        tasks_file=tasks,
        sampling=dict(sampling),
        model_source=model,
        vae=vae,
        output_dir=samples,
        identity=dict(identity),
        merge_record=record,
        eval_prompts={kind: list(templates) for kind, templates in (eval_prompts or {}).items()},
        gram_records=list(recordings or []) or None,
        compositions=compositions,
        compositions_dir=composition_samples,
    )


def prepare_mix_job(*, sources: list, counts: list, mix: str, order: int, tasks) -> dict:
    """The prepare_mix job: the task file `tasks` of mixed concept set `mix`: the first `count`
    concepts of each (domain, count) of `counts`, from that domain's reference task file (the same
    position of `sources`), in the listed order. Concept i of the set gets slot i - 1, so BlockLoRA's
    blocks and Orthogonal Adaptation's columns stay distinct across kinds."""
    from lorachain.data import read_tasks
    from lorachain.data.selection import write_tasks

    if len(sources) != len(counts):
        raise ModularError(f"config key modular.mixes.{mix}: {len(counts)} domains but {len(sources)} task files")
    selected, members = [], []
    for source, (domain, count) in zip(sources, counts):
        available = read_tasks(source)
        if count > len(available):
            raise ModularError(
                f"config key modular.mixes.{mix}.{domain}: {count} concepts but {source} holds {len(available)}"
            )
        selected += available[:count]
        members += [domain] * count
    concepts = [task.concept for task in selected]
    if len(set(concepts)) != len(concepts):
        raise ModularError(f"config key modular.mixes.{mix}: concepts {concepts} are not distinct across its domains")
    write_tasks(tasks, selected, layout="mixed", members=members, order_seed=order, mix=mix)
    return {
        f"concept {index:02d}": f"{task.concept} ({domain})"
        for index, (task, domain) in enumerate(zip(selected, members), 1)
    }
