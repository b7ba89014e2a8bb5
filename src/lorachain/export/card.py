"""The model card (README.md) written beside an export."""

from __future__ import annotations

import json
from pathlib import Path

from lorachain.export.sources import ExportSource
from lorachain.export.writers import CARD_FILE, DIFFUSERS_FILE, KOHYA_FILE, UNET_DIR
from lorachain.models.denoisers import TRANSFORMER_PIPELINES


def _loading(record: dict) -> list[str]:
    files = record["files"]
    lines = ["## Loading", ""]
    if DIFFUSERS_FILE in files:
        lines += [
            "diffusers:",
            "",
            "```python",
            "from diffusers import DiffusionPipeline",
            "",
            f'pipe = DiffusionPipeline.from_pretrained("{record["base_model"]}")',
            'pipe.load_lora_weights("path/to/this/directory")',
            "```",
            "",
        ]
    if KOHYA_FILE in files:
        lines += [f"ComfyUI / AUTOMATIC1111: copy `{KOHYA_FILE}` into the LoRA folder (kohya keys, strength 1).", ""]
    transformer = TRANSFORMER_PIPELINES.get(record["architecture"], "the transformer class")
    for component, model_class in ((UNET_DIR, "UNet2DConditionModel"), ("transformer", transformer)):
        if f"{component}/" in files:
            lines += [
                f"Full weights: `{component}/` is the base model's {component} with the delta added "
                f'(`{model_class}.from_pretrained("path/to/this/directory", subfolder="{component}")`).',
                "",
            ]
    return lines


def _embeddings(record: dict) -> list[str]:
    if not record["embeddings"]:
        return []
    lines = [
        "## Concept tokens",
        "",
        "The concepts were trained with new token embeddings; load them before prompting with the tokens "
        "(SD 1.x: the file's single `clip_l` tensor; SDXL: `clip_l` into `text_encoder`, `clip_g` into "
        "`text_encoder_2`):",
        "",
        "```python",
        "from safetensors.torch import load_file",
        "",
    ]
    for entry in record["embeddings"]:
        lines += [
            f'vectors = load_file("{entry["file"]}")',
            f'pipe.load_textual_inversion(vectors["clip_l"], token="{entry["token"]}", '
            "text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)",
            'if "clip_g" in vectors:',
            f'    pipe.load_textual_inversion(vectors["clip_g"], token="{entry["token"]}", '
            "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)",
        ]
    return [*lines, "```", ""]


def write_card(out: Path, source: ExportSource, record: dict) -> Path:
    exact = record["exact"]
    quality = (
        "exact: the state is a sum of low-rank terms, written as one LoRA of their concatenated factors"
        if exact
        else f"SVD re-factorisation ({json.dumps(record['svd'])}): relative Frobenius error "
        f"{record['relative_error']:.4g} overall, at most {record['max_layer_error']:.4g} in a layer "
        "(per layer: svd-errors.csv)"
    )
    concepts = "\n".join(
        f"| {position} | {item['concept']} | {item['train_prompt']} | {item['token'] or ''} |"
        for position, item in enumerate(source.items, start=1)
    )
    lines = [
        "---",
        f"base_model: {record['base_model']}",
        "library_name: diffusers",
        "tags: [lora, lorachain, text-to-image]",
        "---",
        "",
        f"# lorachain export: {source.kind}",
        "",
        f"- source: `{source.location}`",
        f"- method: `{json.dumps(source.method, sort_keys=True)}`",
        f"- base model: `{record['base_model']}` ({record['architecture']})",
        f"- rank: {record['rank']['min']}..{record['rank']['max']} over {record['layers']} layers",
        f"- {quality}",
        "",
        "| # | concept | training prompt (trigger) | token |",
        "|---|---|---|---|",
        concepts,
        "",
        *_loading(record),
        *_embeddings(record),
    ]
    (out / CARD_FILE).write_text("\n".join(lines))
    return out / CARD_FILE
