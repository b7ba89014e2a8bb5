"""Concept token embeddings (textual inversion / Mix-of-Show's ED-LoRA) as a pipeline carries them.

A state trained with embedding-weight tuning adds new tokens for its concept ("<sks>"); a prompt
that names the concept by its phrase ("a sks sneaker in a jail") is rewritten to use them before it
reaches the pipeline. Whoever loads a state's embeddings into a pipeline records the phrase ->
token map on it (:func:`attach_prompt_map`); every sampler passes its prompts through
:func:`model_prompt`, so the trainer, the samplers and the composition prompts agree on one rule.
"""

from __future__ import annotations

import re
from pathlib import Path

_PROMPT_MAP = "_lorachain_prompt_map"
_LOADED = "_lorachain_loaded_embeddings"  # token -> (embeddings file, sha256) loaded into a pipeline


def attach_prompt_map(pipe, mapping: dict[str, str]) -> None:
    """Record on `pipe` which concept phrase each loaded token stands for (phrase -> token)."""
    current = dict(getattr(pipe, _PROMPT_MAP, {}) or {})
    current.update(mapping)
    setattr(pipe, _PROMPT_MAP, current)


def prompt_map(pipe) -> dict[str, str]:
    return dict(getattr(pipe, _PROMPT_MAP, {}) or {})


def rewrite_prompt(prompt: str, mapping: dict[str, str]) -> str:
    """`prompt` with each concept phrase (a whole word or words) replaced by its token."""
    for phrase in sorted(mapping, key=len, reverse=True):  # longest first: "palette knife" before "knife"
        prompt = re.sub(rf"(?<![\w<]){re.escape(phrase)}(?![\w>])", mapping[phrase], prompt)
    return prompt


def model_prompt(pipe, prompt: str) -> str:
    """The prompt as the pipeline must see it: concept phrases replaced by the tokens loaded into it."""
    return rewrite_prompt(prompt, prompt_map(pipe))


# ------------------------------------------------------------------------------ concepts and states


def concept_words(task) -> tuple[str, str]:
    """(phrase, own words) of a :class:`lorachain.data.Task`: how its prompts name the concept
    (an object's rare token "sks", a style's phrase "palette knife") and the words its token's
    vectors start from by default (the object's class word "sneaker", the style phrase)."""
    from lorachain.data.selection import concept_phrase

    if task.token is not None:
        return task.token, task.class_name
    phrase = concept_phrase(task.concept)
    return phrase, phrase


def expand_tokens(prompt: str, tokenizer) -> str:
    """`prompt` with each multi-vector token ("<sks>") followed by its other vectors' tokens
    ("<sks> <sks>_1 ..."), as diffusers' ``maybe_convert_prompt`` does before encoding."""
    added = tokenizer.added_tokens_encoder
    for token in sorted({piece for piece in tokenizer.tokenize(prompt) if piece in added}):
        extra, index = [], 1
        while f"{token}_{index}" in added:
            extra.append(f"{token}_{index}")
            index += 1
        if extra:
            prompt = prompt.replace(token, " ".join([token, *extra]))
    return prompt


def _tokenizers(pipe) -> list:
    found = (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None))
    return [tokenizer for tokenizer in found if tokenizer is not None]


def load_state_embeddings(pipe, state_dirs) -> dict[str, str]:
    """Load the concept embeddings of the states in `state_dirs` (task or concept directories;
    those whose manifest records none are skipped) into `pipe` with diffusers' own
    ``load_textual_inversion`` (SDXL: once per text encoder), attach their phrase -> token map
    (:func:`attach_prompt_map`) and return it. Loading a state's embeddings into a pipeline that
    already holds them (the same file's bytes) does nothing more. Two states with the same token,
    or a token the pipeline's tokenizer already holds otherwise, are an error naming the files."""
    from lorachain.state import EMBEDDINGS_FILE, ENCODER_KEYS, StateError, read_manifest, read_state_embeddings

    mapping: dict[str, str] = {}
    owners: dict[str, Path] = {}
    before = dict(getattr(pipe, _LOADED, {}) or {})
    loaded = []
    for directory in state_dirs:
        directory = Path(directory)
        manifest = read_manifest(directory)
        embeddings = read_state_embeddings(directory, manifest)
        if embeddings is None:
            continue
        path = directory / EMBEDDINGS_FILE
        if embeddings.token in owners and owners[embeddings.token] == path:
            continue  # the same state named twice
        if embeddings.token in owners:
            raise StateError(
                f"{path}: concept token {embeddings.token!r} is also the token of {owners[embeddings.token]}; "
                "two states with the same token cannot be loaded into one pipeline (retrain one with another "
                "embeddings.token_format or concept token)"
            )
        owners[embeddings.token] = path
        digest = manifest["embeddings"]["sha256"]
        if embeddings.token in before and before[embeddings.token][1] == digest:
            mapping[embeddings.phrase] = embeddings.token  # loaded before: the same vectors
            continue
        if any(embeddings.token in tokenizer.get_vocab() for tokenizer in _tokenizers(pipe)):
            known = f" (loaded from {before[embeddings.token][0]})" if embeddings.token in before else ""
            raise StateError(
                f"{path}: concept token {embeddings.token!r} is already in the pipeline's tokenizer{known}; "
                "two states with the same token cannot be loaded into one pipeline"
            )
        before[embeddings.token] = (path, digest)
        loaded.append(embeddings)
    for embeddings in loaded:
        for attribute, key in ENCODER_KEYS.items():
            encoder = getattr(pipe, attribute, None)
            if encoder is None:
                continue
            if key not in embeddings.vectors:
                raise StateError(f"{owners[embeddings.token]}: no {key!r} vectors for the pipeline's {attribute}")
            tokenizer = getattr(pipe, attribute.replace("text_encoder", "tokenizer"))
            pipe.load_textual_inversion(
                embeddings.vectors[key], token=embeddings.token, text_encoder=encoder, tokenizer=tokenizer
            )
        mapping[embeddings.phrase] = embeddings.token
    setattr(pipe, _LOADED, before)
    attach_prompt_map(pipe, mapping)
    return mapping


def check_embeddings_loaded(pipe) -> None:
    """A pipeline whose U-Net holds a state trained with embedding tuning
    (:func:`lorachain.state.apply_to_unet` records it) must have that state's tokens loaded; a
    StateError names the embeddings file otherwise."""
    from lorachain.models.denoisers import denoiser
    from lorachain.state import NEEDS_EMBEDDINGS, StateError

    vocabularies = [tokenizer.get_vocab() for tokenizer in _tokenizers(pipe)]
    for path, token in getattr(denoiser(pipe), NEEDS_EMBEDDINGS, []):
        if not vocabularies or any(token not in vocabulary for vocabulary in vocabularies):
            raise StateError(
                f"{path}: the state applied to this pipeline was trained with embedding tuning, but its concept "
                f"token {token!r} is not loaded; load its embeddings with "
                "lorachain.embeddings.load_state_embeddings(pipe, state_dirs) before sampling"
            )
