"""The real CLIP BPE tokenizer, rebuilt without a download.

The ``open_clip_torch`` wheel ships OpenAI's BPE merges (``bpe_simple_vocab_16e6.txt.gz``). The
49,408-token vocabulary is rebuilt from them exactly as OpenAI's ``SimpleTokenizer`` does: the 256
byte symbols, the same with ``</w>``, the first 48,894 merges, then the two special tokens; so the
ids match OpenAI's (``<|startoftext|>`` 49406, ``<|endoftext|>`` 49407).
"""

from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path

CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77  # diffusers pads prompts to model_max_length; the tokenizer default would overflow
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
_NUM_MERGES = CLIP_VOCAB_SIZE - 256 * 2 - 2


def bpe_merges_file() -> Path:
    """Locate open_clip's merges file without importing open_clip (which would import torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip_torch is not installed; it ships the CLIP BPE merges the tiny models need")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the open_clip_torch installation")
    return path


@lru_cache(maxsize=1)
def _byte_symbols() -> tuple[str, ...]:
    """GPT-2/CLIP's reversible byte -> printable unicode mapping, in byte order 0..255."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codepoints, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            codepoints[byte] = byte
        else:
            codepoints[byte] = 256 + extra
            extra += 1
    # OpenAI orders the vocabulary by the printable bytes first, then the remapped ones.
    ordered = printable + [b for b in range(256) if b not in printable]
    return tuple(chr(codepoints[b]) for b in ordered)


def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    lines = gzip.open(bpe_merges_file(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    symbols = list(_byte_symbols())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    assert len(tokens) == CLIP_VOCAB_SIZE, len(tokens)
    return {token: index for index, token in enumerate(tokens)}, merges


def build_clip_tokenizer(pad_token: str = EOS_TOKEN):
    """A ``transformers.CLIPTokenizer`` identical in ids to ``openai/clip-vit-*``'s."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=CLIP_MAX_LENGTH)
