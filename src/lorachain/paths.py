"""Where every file of a run lives: the one home of the path templates that the workflow's rules,
its input functions and the library share. Templates hold Snakemake wildcards in braces
(``{domain}``, ``{method}``, ``{order}``, ``{seed}``, ``{task}``, ``{adapter}``, ``{concept}``,
``{merge}``, ``{k}``, ``{metric}``, ``{recording}``, ``{composition}``); ``str.format`` fills them
in the library. Import-light.
"""

from __future__ import annotations

RESULTS = "results"
RESOURCES = "resources"
LOGS = "logs"

# The files of one trained state (a continual task or a modular concept).
STATE_FILE = "state.json"
LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' save_lora_weights writes
LOSS_FILE = "loss.csv"
GRAMS_FILE = "grams-{recording}.safetensors"  # recording: how the inputs were recorded (merging.fusion)
GRAMS_RECORD_FILE = "grams-{recording}.json"  # what was recorded and how long it took

# Built models and generated data.
TINY_MODEL = f"{RESOURCES}/models/tiny-{{architecture}}"
TINY_ENCODER = f"{RESOURCES}/metrics/tiny-{{encoder}}"
SYNTHETIC_DATA = f"{RESOURCES}/data/synthetic-{{domain}}"
# The miniature world (config key `world`): fixed paths, which a config names as it names real models.
WORLD = f"{RESOURCES}/world"
WORLD_PIPELINE = f"{WORLD}/pipeline"
WORLD_ENCODER = f"{WORLD}/{{encoder}}"  # dino and clip: save_pretrained directories
WORLD_CSD = f"{WORLD}/csd/checkpoint.pth"  # the published CSD checkpoint layout
WORLD_OBJECTS = f"{WORLD}/data/objects"  # DreamBooth layout
WORLD_STYLES = f"{WORLD}/data/styles"  # UnlearnCanvas layout
WORLD_EVALUATION = f"{WORLD}/evaluation.json"  # and .md

# The continual regime: one run = (domain, method, order, seed), tasks 01..T.
TASKS = f"{RESULTS}/{{domain}}/tasks/order{{order}}.json"
RUN = "{domain}/{method}/order{order}-seed{seed}"
TASK_DIR = f"{RESULTS}/{RUN}/task{{task}}"
SAMPLES_DIR = f"{RESULTS}/{RUN}/samples/after{{task}}"
RUN_SCORES = f"{RESULTS}/{RUN}/scores.csv"
EXPORT_DIR = f"{RESULTS}/{RUN}/export"  # `snakemake export`: the run's final state (lorachain.export)
BASE_SAMPLES_DIR = f"{RESULTS}/{{domain}}/base/samples"
BASE_SCORES = f"{RESULTS}/{{domain}}/base/scores.csv"
# Prior preservation (training.prior_preservation): the base model's class images, <class>/<i>.png.
CLASS_IMAGES_DIR = f"{RESULTS}/{{domain}}/class_images"
# Composed prompts (lorachain.composition), sampled beside each sample set and scored with it.
COMPOSITIONS_DIR = f"{RESULTS}/{RUN}/compositions/after{{task}}"
RUN_COMPOSITION_SCORES = f"{RESULTS}/{RUN}/composition-scores.csv"
BASE_COMPOSITIONS_DIR = f"{RESULTS}/{{domain}}/base/compositions"
BASE_COMPOSITION_SCORES = f"{RESULTS}/{{domain}}/base/composition-scores.csv"
REFERENCE_EMBEDDINGS = f"{RESULTS}/{{domain}}/references.safetensors"
MATRICES = f"{RESULTS}/{{domain}}/matrices.csv"
TABLE = f"{RESULTS}/tables/{{domain}}"  # .csv and .md
FIGURES = f"{RESULTS}/figures/{{domain}}"

# The modular regime: concepts trained independently, merged k at a time.
MODULAR_DIR = f"{RESULTS}/{{domain}}/modular"
CONCEPT_DIR = f"{MODULAR_DIR}/adapters/{{adapter}}/concept{{concept}}"
# Tracker event files (training.tracking) of a training job: logs (they hold wall times), not results
TASK_TRACKING = f"{LOGS}/{RUN}/tracking/task{{task}}"
CONCEPT_TRACKING = f"{LOGS}/{{domain}}/modular/{{adapter}}/tracking/concept{{concept}}"
GRAMS = f"{CONCEPT_DIR}/{GRAMS_FILE}"
GRAMS_RECORD = f"{CONCEPT_DIR}/{GRAMS_RECORD_FILE}"
MERGE_DIR = f"{MODULAR_DIR}/merges/{{merge}}/k{{k}}"
MERGE_SCORES = f"{MODULAR_DIR}/merges/{{merge}}/scores.csv"
MERGE_COMPOSITIONS_DIR = f"{MERGE_DIR}/compositions"
MERGE_EXPORT_DIR = f"{MERGE_DIR}/export"  # `snakemake export`: the merge at the largest k
MERGE_COMPOSITION_SCORES = f"{MODULAR_DIR}/merges/{{merge}}/composition-scores.csv"
COMPOSITION_TABLE = f"{RESULTS}/tables/{{domain}}-composition-{{composition}}"  # .csv, .md and -by-k.csv
MODULAR_TABLE = f"{RESULTS}/tables/{{domain}}-modular"  # .csv and .md
MODULAR_POINTS = f"{MODULAR_TABLE}-by-k.csv"  # every merge's alignment and prior drift at every k
ABLATION_TABLE = f"{RESULTS}/tables/{{domain}}-ablation"  # .csv and .md: BlockLoRA's Table 3 layout
# .csv and .md: versions, commit and model revision of every state and table (no domain has a '-')
PROVENANCE_TABLE = f"{RESULTS}/tables/run-provenance"
DIAGNOSTICS_DIR = f"{MODULAR_DIR}/diagnostics/{{adapter}}"

BENCHMARKS = f"{RESULTS}/benchmarks"


def task_label(index: int) -> str:
    """Tasks and concepts are numbered 01, 02, ... in paths (so they sort)."""
    return f"{index:02d}"


def run_dir(domain: str, method: str, order, seed) -> str:
    return f"{RESULTS}/{RUN.format(domain=domain, method=method, order=order, seed=seed)}"


def task_dir(domain: str, method: str, order, seed, task: int) -> str:
    return TASK_DIR.format(domain=domain, method=method, order=order, seed=seed, task=task_label(task))


def state_files(directory: str) -> list[str]:
    """What a later job reads of a trained state: its manifest and its LoRA file."""
    return [f"{directory}/{STATE_FILE}", f"{directory}/{LORA_FILE}"]
