"""Which metric needs which encoder, and each dataset layout's default metrics
(docs/metrics.md#default-metrics). Import-light (no torch) so the Snakefile can read it while parsing."""

METRIC_ENCODER = {
    "dino": "dino",
    "clip_i": "clip",
    "clip_t": "clip",
    "clip_score": "clip",
    "csd": "csd",
    "prior_drift_dino": "dino",
    "prior_drift_clip": "clip",
    "prior_drift_csd": "csd",
}
IMAGE_METRICS = ("dino", "clip_i", "csd")  # mean all-pairs cosine against the task's reference images
# Text alignment in two conventions: clip_t is the raw cosine of each image with its own prompt;
# clip_score is CLIPScore (Hessel et al. 2021), 2.5 * max(cos, 0) with the prompt prefixed by
# "A photo depicts" and the concept's class word in place of its rare token (BlockLoRA's Table 1 scale).
TEXT_METRICS = ("clip_t", "clip_score")
# 1 - cosine of each class-prompt image with the base model's image from the same noise (lower is better).
PRIOR_METRICS = ("prior_drift_dino", "prior_drift_clip", "prior_drift_csd")
ALL_METRICS = ("dino", "clip_i", "clip_t", "clip_score", "csd", *PRIOR_METRICS)
LOWER_IS_BETTER = PRIOR_METRICS
DEFAULT_METRICS = {
    "dreambooth": ["dino", "clip_i", "clip_t", "clip_score", "prior_drift_clip"],
    "unlearncanvas": ["csd", "dino", "clip_t", "clip_score", "prior_drift_csd"],
}
# The key of each encoder's metric block that names its model (the others, tiny and tiny_seed, are settings).
MODEL_KEYS = {"dino": "pretrained", "clip": "pretrained", "csd": "checkpoint"}
# What a tiny encoder's loader block points at, inside the directory save_tiny_encoder writes.
TINY_ENCODER_ENTRY = {"dino": ("pretrained", ""), "clip": ("pretrained", ""), "csd": ("checkpoint", "checkpoint.pth")}


def encoders_for(metrics) -> list[str]:
    return sorted({METRIC_ENCODER[metric] for metric in metrics})
