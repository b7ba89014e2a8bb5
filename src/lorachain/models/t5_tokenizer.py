"""A small T5 tokenizer built offline, for the tiny SD3 and FLUX pipelines.

The real T5 tokenizer (a 32,000-piece SentencePiece unigram model) cannot be downloaded here. This
one has T5's structure and special tokens (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2; ``</s>`` appended
to every sequence; case-sensitive; SentencePiece's ``▁`` word-start marker) and is a unigram model
too, over a vocabulary the project owns: the words of its prompts (the miniature world's captions,
DreamBooth's and UnlearnCanvas's class nouns, the evaluation templates, the rare tokens ``sks``,
``zwz``, ...), the consonant-vowel syllables the world's made-up names are made of, and every
printable ASCII character, so any ASCII prompt tokenizes without ``<unk>``.

Why not ``tokenizers``' ``UnigramTrainer``: on a corpus this small it prunes to about 140 pieces,
mostly single characters ("photo" became five pieces), and its scores differ in the last bits from
run to run (parallel float sums). Here a piece's score is its corpus log-frequency, computed from
integer counts (deterministic), and ``transformers.T5TokenizerFast`` (tokenizers' ``Unigram`` model)
does the Viterbi segmentation: a known word is one piece, an unknown one splits into syllables and
characters.
"""

from __future__ import annotations

import math
import string
from collections import Counter
from itertools import product

T5_MAX_LENGTH = 512  # T5's; SD3's (256) and FLUX's (512) pipelines pad and truncate to their own lengths
T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as T5's
WORD_START = "▁"  # SentencePiece's marker of a piece that starts a word

# DreamBooth's 15 class nouns (its 30 subjects' classes) and UnlearnCanvas's 20 object classes:
# the real datasets' prompts, beside the synthetic stand-ins' (lorachain.data.synthetic).
DREAMBOOTH_CLASS_NOUNS = (
    "backpack", "stuffed animal", "bowl", "can", "candle", "cat", "clock", "sneaker", "dog", "toy",
    "boot", "glasses", "cartoon", "teapot", "vase",
)  # fmt: skip
UNLEARNCANVAS_OBJECTS = (
    "architectures", "bears", "birds", "butterfly", "cats", "dogs", "fishes", "flame", "flowers", "frogs",
    "horses", "human", "jellyfish", "rabbits", "sandwiches", "sea", "statues", "towers", "trees", "waterfalls",
)  # fmt: skip


def prompt_corpus() -> list[str]:
    """The sentences the vocabulary is counted on: the project's prompts, in a fixed order."""
    from lorachain.data.selection import (
        BLOCKLORA_OBJECT_TEMPLATES,
        BLOCKLORA_STYLE_TEMPLATES,
        OBJECT_EVAL_TEMPLATES,
        OBJECT_TOKENS,
        OBJECT_TRAIN_TEMPLATE,
        STYLE_EVAL_TEMPLATES,
        STYLE_TRAIN_TEMPLATE,
    )
    from lorachain.data.synthetic import DEFAULT_DREAMBOOTH_SUBJECTS
    from lorachain.world.scene import BACKGROUNDS, CLASSES, COLOURS, CONCEPT_STYLE_NAMES, PLURALS

    # The world's captions (lorachain.world.corpus): classes, colours, backgrounds, plurals.
    sentences = [
        f"a photo of a {colour} {shape} on a {background} background"
        for shape, colour, background in product(CLASSES, COLOURS, BACKGROUNDS)
    ]
    sentences += [f"an image of {PLURALS[shape]}" for shape in CLASSES]  # styled captions
    nouns = sorted({*DREAMBOOTH_CLASS_NOUNS, *DEFAULT_DREAMBOOTH_SUBJECTS.values()})
    for token, noun in product(OBJECT_TOKENS, nouns):
        subject = f"{token} {noun}"
        sentences += [OBJECT_TRAIN_TEMPLATE.format(subject), f"a photo of a {noun}"]
        sentences += [template.format(subject) for template in OBJECT_EVAL_TEMPLATES + BLOCKLORA_OBJECT_TEMPLATES]
    styles = [name.lower().replace("_", " ") for name in CONCEPT_STYLE_NAMES]
    for style, subject in product(styles, UNLEARNCANVAS_OBJECTS):
        sentences.append(STYLE_TRAIN_TEMPLATE.format(style, subject))
        sentences += [template.format(style) for template in STYLE_EVAL_TEMPLATES + BLOCKLORA_STYLE_TEMPLATES]
    return sentences


def _syllables() -> list[str]:
    """The consonant-vowel syllables of the world's made-up names (lorachain.world.scene)."""
    from lorachain.world.scene import _ONSETS, _VOWELS

    return [onset + vowel for onset, vowel in product(_ONSETS, _VOWELS)]


def t5_vocabulary() -> list[tuple[str, float]]:
    """(piece, log-probability score) in id order: the special tokens, the corpus words by
    frequency, then the syllables and the characters (scored below any word, so that a known word
    is always one piece)."""
    counts = Counter(word for sentence in prompt_corpus() for word in sentence.split())
    total = sum(counts.values())
    floor = math.log(1 / total)
    words = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    pieces = [(WORD_START + word, math.log(count / total)) for word, count in words]
    fallback = [(WORD_START, floor - 1.0)]
    fallback += [(piece, floor - 2.0) for syllable in _syllables() for piece in (WORD_START + syllable, syllable)]
    fallback += [(char, floor - 3.0) for char in string.printable.strip()]
    seen = {piece for piece, _ in pieces}
    pieces += [(piece, score) for piece, score in fallback if piece not in seen]
    return [(token, 0.0) for token in T5_SPECIAL_TOKENS] + pieces


def build_t5_tokenizer(model_max_length: int = T5_MAX_LENGTH):
    """A ``transformers.T5TokenizerFast`` over :func:`t5_vocabulary` (no sentinel ``<extra_id_*>``
    tokens: the text encoders never use them)."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast(vocab=t5_vocabulary(), extra_ids=0, model_max_length=model_max_length)
