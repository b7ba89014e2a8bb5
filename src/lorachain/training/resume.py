"""In-task checkpoints (resume after preemption) and deferred SIGTERM.

Every ``training.checkpoint_every`` steps, and at the end of the step during which SIGTERM arrives,
the trainer writes ``<task dir>/.resume/checkpoint.safetensors`` (not a declared output, so a retry
keeps it): the LoRA factors, the optimizer (and grad-scaler) state, the losses so far and the state
of the step generator as tensors, with the step, the optimizer's hyperparameters and a fingerprint
of the run as JSON in the file's metadata (no pickle anywhere). A checkpoint is used only by a
run with the same fingerprint; any other one is logged and deleted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path

from lorachain.files import sha256_file
from lorachain.methods import ContinualMethod
from lorachain.state import LORA_FILE, STATE_FILE, read_chain
from lorachain.torch_env import torch
from lorachain.training.config import TRAINING_OPTIONS, TrainingConfig

# In-task checkpoints (resume after preemption): <task dir>/.resume/checkpoint.safetensors.
RESUME_DIR = ".resume"
CHECKPOINT_FILE = "checkpoint.safetensors"
CHECKPOINT_FORMAT = 2  # 2: safetensors + JSON metadata (1 was a torch.save pickle)
_CHECKPOINT_METADATA = "lorachain_checkpoint"
# Fields that do not change what is computed: a checkpoint stays valid when they change.
_NOT_FINGERPRINTED = ("checkpoint_every",)
_TRANSFORMER_ONLY = ("flow_matching", "guidance")  # in the fingerprint only when set

log = logging.getLogger(__name__)


def run_fingerprint(
    *,
    config: TrainingConfig,
    method: ContinualMethod,
    task_index: int,
    seed: int,
    this_seed: int,
    model_source,
    vae,
    train_images,
    train_prompt: str,
    previous_state,
    run: dict | None,
    concept: str | None,
    slot: int = 0,
    class_images=None,
) -> dict:
    """What a task's training computes, as JSON: an in-task checkpoint is used only by the same run.
    The previous state enters through the bytes of every manifest of its chain and of its LoRA
    file, the training images through their bytes (a moved dataset still matches), and so do
    prior preservation's class images. The DreamBooth-script options enter only when set
    (:meth:`TrainingConfig.options_set`), so a run without them keeps its fingerprint."""
    options = config.options_set()
    defaults = dataclasses.asdict(TrainingConfig())
    training = {
        k: v
        for k, v in dataclasses.asdict(config).items()
        if k not in _NOT_FINGERPRINTED
        and (k not in TRAINING_OPTIONS or k in options)
        and (k not in _TRANSFORMER_ONLY or v != defaults[k])  # a U-Net run keeps its fingerprint
    }
    previous = None
    if previous_state is not None:
        previous = {
            "chain": [
                hashlib.sha256((directory / STATE_FILE).read_bytes()).hexdigest()
                for directory, _ in read_chain(previous_state)
            ],
            "lora": sha256_file(Path(previous_state) / LORA_FILE),
        }
    fingerprint = {
        "format": CHECKPOINT_FORMAT,
        "task_index": task_index,
        "seed": seed,
        "task_seed": this_seed,
        "method": {"name": method.name, "params": method.params},
        "model_source": str(model_source),
        "vae": None if vae is None else str(vae),
        "training": training,
        "train_prompt": train_prompt,
        "train_images": [sha256_file(path) for path in train_images],
        "previous_state": previous,
        "run": run or {},
        "concept": concept,
        "slot": slot,
    }
    if class_images is not None:
        fingerprint["class_images"] = [sha256_file(path) for path in class_images]
    return json.loads(json.dumps(fingerprint, sort_keys=True, default=str))  # as it reads back


def _fsync_directory(directory: Path) -> None:
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _checkpoint_tensors_and_json(payload: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split a checkpoint payload into safetensors tensors and a JSON document that names them."""
    tensors = {"losses": payload["losses"], "generator": payload["generator"]}
    tensors.update({f"lora/{name}": value for name, value in payload["lora"].items()})
    optimizer = payload["optimizer"]
    state = {}
    for index, entry in optimizer["state"].items():
        state[str(index)] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{key}"] = value
                state[str(index)][key] = {"tensor": f"optimizer/{index}/{key}"}
            else:
                state[str(index)][key] = {"value": value}
    document = {
        "format": payload["format"],
        "fingerprint": payload["fingerprint"],
        "step": payload["step"],
        "lora": sorted(payload["lora"]),
        "optimizer": {"state": state, "param_groups": optimizer["param_groups"]},
        "scaler": payload["scaler"],
    }
    return {key: value.detach().cpu().contiguous() for key, value in tensors.items()}, document


def save_checkpoint(resume_dir: Path, payload: dict) -> Path:
    """Write the checkpoint atomically (a temporary file, flushed to disk, then renamed over the old
    one) as one safetensors file whose metadata holds the JSON part."""
    from safetensors.torch import save

    resume_dir.mkdir(parents=True, exist_ok=True)
    path = resume_dir / CHECKPOINT_FILE
    temporary = resume_dir / f".{CHECKPOINT_FILE}.tmp{os.getpid()}"
    tensors, document = _checkpoint_tensors_and_json(payload)
    data = save(tensors, metadata={_CHECKPOINT_METADATA: json.dumps(document, sort_keys=True)})
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync_directory(resume_dir)
    return path


def read_checkpoint(path: str | Path) -> dict:
    """An in-task checkpoint as the payload it was written from (raises on an unreadable file)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        document = json.loads((handle.metadata() or {})[_CHECKPOINT_METADATA])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    state = {
        int(index): {key: tensors[item["tensor"]] if "tensor" in item else item["value"] for key, item in entry.items()}
        for index, entry in document["optimizer"]["state"].items()
    }
    return {
        "format": document["format"],
        "fingerprint": document["fingerprint"],
        "step": document["step"],
        "losses": tensors["losses"],
        "lora": {name: tensors[f"lora/{name}"] for name in document["lora"]},
        "optimizer": {"state": state, "param_groups": document["optimizer"]["param_groups"]},
        "scaler": document["scaler"],
        "generator": tensors["generator"],
    }


def _checkpoint_problem(
    checkpoint: dict, fingerprint: dict, named_parameters, optimizer, generator_state, steps: int
) -> str | None:
    """Why `checkpoint` cannot continue this run (None: it can). Checked in full before anything
    is loaded, so a refused checkpoint leaves the fresh run untouched."""
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        return (
            f"checkpoint format {checkpoint.get('format') if isinstance(checkpoint, dict) else None!r}, "
            f"this lorachain writes {CHECKPOINT_FORMAT}"
        )
    try:
        theirs = json.loads(checkpoint["fingerprint"])
    except (KeyError, TypeError, json.JSONDecodeError):
        return "no readable fingerprint"
    if theirs != fingerprint:
        differ = sorted(key for key in set(theirs) | set(fingerprint) if theirs.get(key) != fingerprint.get(key))
        return f"written by another configuration (differs in: {', '.join(differ)})"
    step, losses = checkpoint.get("step"), checkpoint.get("losses")
    if not isinstance(step, int) or not 0 <= step <= steps:
        return f"step {step!r} outside 0..{steps}"
    if not isinstance(losses, torch.Tensor) or losses.shape != (step,):
        return "losses do not match the step"
    lora = checkpoint.get("lora")
    if not isinstance(lora, dict) or sorted(lora) != sorted(name for name, _ in named_parameters):
        return "its LoRA parameters are not this U-Net's"
    for name, parameter in named_parameters:
        if (
            not isinstance(lora[name], torch.Tensor)
            or lora[name].shape != parameter.shape
            or lora[name].dtype != parameter.dtype
        ):
            return f"parameter {name} has another shape or dtype"
    state = checkpoint.get("optimizer")
    if not isinstance(state, dict) or len(state.get("param_groups", ())) != len(optimizer.param_groups):
        return "optimizer state of another optimizer"
    flat = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in state["param_groups"] for i in group["params"]]
    if [len(g["params"]) for g in state["param_groups"]] != [len(g["params"]) for g in optimizer.param_groups]:
        return "optimizer state of other parameters"
    for index, entry in state.get("state", {}).items():
        if index not in ids:
            return "optimizer state of other parameters"
        parameter = flat[ids.index(index)]
        for key, value in entry.items():
            if (
                isinstance(value, torch.Tensor)
                and value.dim() > 0
                and key.startswith("exp_avg")
                and value.shape != parameter.shape
            ):
                return f"optimizer state {key} of another shape"
    generator = checkpoint.get("generator")
    if (
        not isinstance(generator, torch.Tensor)
        or generator.dtype != torch.uint8
        or generator.shape != generator_state.shape
    ):
        return "no step-generator state"
    return None


def load_checkpoint(
    resume_dir: Path, fingerprint: dict, named_parameters, optimizer, generator: torch.Generator, steps: int
) -> dict | None:
    """The checkpoint in `resume_dir` if it continues this run; any other one is logged and deleted."""
    path = resume_dir / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        checkpoint = read_checkpoint(path)
    except Exception as error:  # a truncated or foreign file: start afresh rather than fail the job
        problem = f"unreadable ({type(error).__name__}: {error})"
    else:
        problem = _checkpoint_problem(
            checkpoint, fingerprint, named_parameters, optimizer, generator.get_state(), steps
        )
    if problem is not None:
        log.warning("%s: ignoring the in-task checkpoint: %s; deleting it and training from step 0", path, problem)
        shutil.rmtree(resume_dir, ignore_errors=True)
        return None
    return checkpoint


@contextlib.contextmanager
def deferred_sigterm():
    """While active, SIGTERM only sets `.signum` of the yielded object (the training loop checks it
    at the end of each step); the previous handler comes back afterwards. Signal handlers can only
    be installed from the main thread: elsewhere SIGTERM keeps its handler."""

    class Request:
        signum: int | None = None

        def __call__(self, signum, frame):
            self.signum = signum

    request = Request()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = signal.signal(signal.SIGTERM, request)
    try:
        yield request
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


class CheckpointWriter:
    """Writes one task's in-task checkpoints and counts them and the time they take (which is not
    training time)."""

    def __init__(self, resume_dir: Path, fingerprint: dict):
        self.resume_dir, self.fingerprint = resume_dir, fingerprint
        self.seconds, self.written = 0.0, 0

    def write(
        self, *, step: int, losses: list[float], named_parameters, optimizer, scaler, generator: torch.Generator
    ) -> Path:
        begun = time.perf_counter()
        path = save_checkpoint(
            self.resume_dir,
            {
                "format": CHECKPOINT_FORMAT,
                "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
                "step": step,
                "losses": torch.tensor(losses, dtype=torch.float64),
                "lora": {name: parameter.detach().cpu() for name, parameter in named_parameters},
                "optimizer": optimizer.state_dict(),
                "scaler": None if scaler is None else scaler.state_dict(),
                "generator": generator.get_state(),
            },
        )
        self.seconds += time.perf_counter() - begun
        self.written += 1
        return path


def restore_checkpoint(
    checkpoint: dict, named_parameters, optimizer, scaler, generator: torch.Generator
) -> tuple[int, list[float]]:
    """Load a checkpoint that :func:`load_checkpoint` accepted into the prepared training objects
    in place (factors, optimizer, grad scaler, step generator); returns (step, losses so far)."""
    with torch.no_grad():
        for name, parameter in named_parameters:
            parameter.copy_(checkpoint["lora"][name])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    generator.set_state(checkpoint["generator"])
    return checkpoint["step"], checkpoint["losses"].tolist()
