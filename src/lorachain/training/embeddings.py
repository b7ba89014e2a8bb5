"""Embedding-weight tuning in training: a concept's new tokens, whose input embeddings train with
the U-Net's LoRA (textual inversion; the single-embedding form of Mix-of-Show's ED-LoRA).

Each text encoder of the pipeline (``text_encoder``; SDXL's ``text_encoder_2`` too) gets the
concept's tokens in its tokenizer and a :class:`ConceptTokenEmbedding` in place of its token
embedding: the frozen base matrix followed by the trainable new rows, so the optimizer (weight
decay included) never touches a pre-existing row. The (rewritten) training prompt is then encoded
at every step with gradients. What the trainer reads from a method is only its ``embeddings``
settings (:class:`lorachain.methods.EmbeddingSettings`).
"""

from __future__ import annotations

from dataclasses import dataclass

from lorachain.embeddings import rewrite_prompt
from lorachain.methods import EmbeddingSettings
from lorachain.state import ENCODER_KEYS, ConceptEmbeddings
from lorachain.torch_env import torch
from lorachain.training.conditioning import encode_condition_with_grad
from lorachain.training.config import TrainingError


class ConceptTokenEmbedding(torch.nn.Module):
    """A token embedding whose rows are a frozen base matrix and trainable new rows after it:
    ``forward(ids) = embedding(ids, cat(base, new_rows))``."""

    def __init__(self, base: torch.nn.Embedding, new_rows: torch.Tensor):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.new_rows = torch.nn.Parameter(new_rows.to(base.weight.device, torch.float32).clone())

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.base.weight, self.new_rows.to(self.base.weight.dtype)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(ids, self.weight)


@dataclass
class TrainableTokens:
    """A concept's tokens added to every text encoder of a pipeline, and the prompt that uses them."""

    pipe: object
    token: str
    phrase: str
    prompt: str  # the training prompt with the phrase replaced by the token
    modules: dict[str, ConceptTokenEmbedding]  # by ENCODER_KEYS key

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(f"embeddings.{key}", module.new_rows) for key, module in self.modules.items()]

    def condition(self, device) -> dict:
        """The U-Net conditioning of the training prompt, differentiable in the new rows."""
        return encode_condition_with_grad(self.pipe, self.prompt, device)

    def result(self) -> ConceptEmbeddings:
        vectors = {key: module.new_rows.detach().float().cpu().clone() for key, module in self.modules.items()}
        for key, value in vectors.items():
            if not torch.isfinite(value).all():
                raise TrainingError(f"token {self.token!r}: non-finite embedding vectors ({key}); nothing was written")
        return ConceptEmbeddings(token=self.token, phrase=self.phrase, vectors=vectors)


def _encoders(pipe) -> list[tuple[str, object, object]]:
    """(file key, tokenizer, text encoder) of each text encoder of `pipe`."""
    found = []
    for attribute, key in ENCODER_KEYS.items():
        encoder = getattr(pipe, attribute, None)
        tokenizer = getattr(pipe, attribute.replace("text_encoder", "tokenizer"), None)
        if encoder is not None and tokenizer is not None:
            found.append((key, tokenizer, encoder))
    return found


def _initial_vector(tokenizer, table: torch.Tensor, words: str, key: str) -> torch.Tensor:
    ids = tokenizer(words, add_special_tokens=False).input_ids
    if not ids:
        raise TrainingError(f"config key {key}.embeddings.init_word: {words!r} has no tokens; give a word")
    return table[torch.tensor(ids)].float().mean(dim=0)


def check_new_tokens(tokenizer, names: list[str], key: str) -> None:
    """Each of `names` must be a new word for `tokenizer`: not in its vocabulary (added tokens
    included) and not a word it already reads as one token (which the new token would shadow)."""
    vocabulary = tokenizer.get_vocab()
    for name in names:
        pieces = tokenizer.tokenize(name)
        if name in vocabulary or len(pieces) == 1:
            raise TrainingError(
                f"config key {key}.embeddings.token_format: the concept token {name!r} is already in the "
                "tokenizer's vocabulary (a word the model knows, or a token added before); choose a "
                "token_format that makes a new word, such as '<{}>'"
            )


def add_concept_tokens(
    pipe, settings: EmbeddingSettings, phrase: str, init_words: str, train_prompt: str, key: str
) -> TrainableTokens:
    """Add the concept's tokens (``settings.token_names(phrase)``) to every tokenizer of `pipe`, put
    a :class:`ConceptTokenEmbedding` with their initial vectors (the mean embedding of
    ``settings.init_word``, else of `init_words`) in each text encoder, freeze the encoders, and
    rewrite `train_prompt` to use the token. `key` is the method's config key (for errors)."""
    names = settings.token_names(phrase)
    token = names[0]
    prompt = rewrite_prompt(train_prompt, {phrase: token})
    if token not in prompt:
        raise TrainingError(
            f"the training prompt {train_prompt!r} does not name the concept phrase {phrase!r}: "
            f"embedding tuning ({key}.embeddings) has no token to train"
        )
    modules = {}
    for file_key, tokenizer, encoder in _encoders(pipe):
        check_new_tokens(tokenizer, names, key)
        embedding = encoder.get_input_embeddings()
        rows = embedding.weight.shape[0]
        if len(tokenizer) != rows:
            raise TrainingError(
                f"{file_key}: the tokenizer holds {len(tokenizer)} tokens but its text encoder's embedding has "
                f"{rows} rows; embedding tuning ({key}.embeddings) needs them equal (as diffusers' "
                "load_textual_inversion does)"
            )
        initial = _initial_vector(tokenizer, embedding.weight.detach(), settings.init_word or init_words, key)
        added = tokenizer.add_tokens(names)
        ids = tokenizer.convert_tokens_to_ids(names)
        if added != len(names) or ids != list(range(rows, rows + len(names))):
            raise TrainingError(f"config key {key}.embeddings.token_format: could not add the tokens {names}")
        encoder.requires_grad_(False)
        encoder.eval()
        module = ConceptTokenEmbedding(embedding, initial.expand(len(names), -1))
        encoder.set_input_embeddings(module)
        modules[file_key] = module
    if not modules:
        raise TrainingError(f"config key {key}.embeddings: the pipeline has no text encoder with a tokenizer")
    return TrainableTokens(pipe=pipe, token=token, phrase=phrase, prompt=prompt, modules=modules)
