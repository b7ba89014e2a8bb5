"""Which metric needs which encoder, and each dataset layout's default metrics
(docs/metrics.md#default-metrics). Import-light (no torch) so the Snakefile can read it while parsing."""

METRIC_ENCODER = {"dino": "dino", "clip_i": "clip", "clip_t": "clip", "csd": "csd"}
IMAGE_METRICS = ("dino", "clip_i", "csd")  # mean all-pairs cosine against the task's reference images
TEXT_METRICS = ("clip_t",)  # mean cosine of each image with its own prompt
ALL_METRICS = ("dino", "clip_i", "clip_t", "csd")
DEFAULT_METRICS = {"dreambooth": ["dino", "clip_i", "clip_t"], "unlearncanvas": ["csd", "dino", "clip_t"]}
# The key of each encoder's metric block that names its model (the others, tiny and tiny_seed, are settings).
MODEL_KEYS = {"dino": "pretrained", "clip": "pretrained", "csd": "checkpoint"}
# What a tiny encoder's loader block points at, inside the directory save_tiny_encoder writes.
TINY_ENCODER_ENTRY = {"dino": ("pretrained", ""), "clip": ("pretrained", ""), "csd": ("checkpoint", "checkpoint.pth")}


def encoders_for(metrics) -> list[str]:
    return sorted({METRIC_ENCODER[metric] for metric in metrics})
