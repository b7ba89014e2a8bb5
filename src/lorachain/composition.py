"""Composing concepts: several concepts in one prompt, sampled and scored per concept.

Modular customization exists so that a user can put several concepts in one image: a subject in a
personal style, or a group of subjects (BlockLoRA's Figures 2, 6 and 7; Mix-of-Show; ZipLoRA).
A composition (config key ``compositions.<name>``) names a concept set, prompt templates with
named placeholders ("a {subject} in {style} style", "a {a} and a {b} on a beach") and groups of
concepts by their position in the set (1-based), one per placeholder::

    compositions:
      stylized: {set: mixed, prompts: ["{style} image of a {subject}"], groups: {subject: [1, 2], style: [3]}}
      together: {set: objects, prompts: ["a {a} and a {b}"], groups: [[1, 2]]}

``groups`` is a list of position lists (in the placeholders' order of first appearance) or a
mapping placeholder -> positions, whose product is taken. Each placeholder is filled with the
member's phrase as its own prompts name it ("sks star", "byzantine"), so a model with learned
concept tokens sees them through :func:`lorachain.embeddings.model_prompt`.

Where it applies: in the modular regime, every merge of the set that holds all the group's members
(k >= the largest position); in the continual regime (a composition whose set is a continual
domain), every state of every run after the task at the group's largest position, positions being
the run's own task order; and the base model, on the set's reference order.

Sampling is :func:`lorachain.sample.sample_compositions`; scoring
(:func:`lorachain.metrics.scoring.score_compositions`): every member is scored against its own references by its
own domain's image metrics (a subject by DINO / CLIP-I, a style by CSD), on the images of each
prompt; text alignment (CLIP-T and CLIPScore, the class word in place of each rare token) on the
whole prompt. :func:`member_summary` gives, per prompt and metric, the minimum and the mean over
the members that metric scores: docs/metrics.md#composition says what whole-image similarity can
and cannot tell for two subjects.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from itertools import product
from pathlib import Path

COMPOSITION_COLUMNS = (
    "path",
    "model",
    "method",
    "domain",
    "order",
    "seed",
    "after_task",
    "composition",
    "group",
    "placeholders",
    "positions",
    "concepts",
    "prompt_index",
    "prompt",
    "plain_prompt",
    "sample",
    "noise_seed",
)
SCORE_COLUMNS = (
    "model",
    "method",
    "domain",
    "order",
    "seed",
    "after_task",
    "composition",
    "group",
    "prompt_index",
    "member",
    "position",
    "concept",
    "metric",
    "score",
    "n_images",
)
WHOLE_PROMPT = "prompt"  # the member column of a text metric: it reads the whole prompt
SEPARATOR = "+"


class CompositionError(ValueError):
    """A composition that cannot be used; the message names the config key and the fix."""


@dataclass(frozen=True)
class Composition:
    name: str
    set: str
    prompts: tuple[str, ...]
    placeholders: tuple[str, ...]
    groups: tuple[tuple[int, ...], ...]

    @property
    def key(self) -> str:
        return f"compositions.{self.name}"

    def groups_within(self, k: int) -> list[tuple[int, ...]]:
        """The groups whose members are all among the first k concepts."""
        return [group for group in self.groups if max(group) <= k]


def placeholders_of(template: str) -> list[str]:
    """The named placeholders of a template, in order of first appearance."""
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as error:
        raise CompositionError(f"{template!r}: not a prompt template ({error})") from None
    return list(dict.fromkeys(fields))


def parse_composition(name: str, block: dict) -> Composition:
    """A config block as a :class:`Composition`; errors name ``compositions.<name>.<key>``."""
    key = f"compositions.{name}"
    prompts = list(block.get("prompts") or [])
    if not prompts:
        raise CompositionError(f"config key {key}.prompts: give at least one prompt template")
    placeholders = placeholders_of(prompts[0])
    if len(placeholders) < 2 or "" in placeholders or any(not p.isidentifier() for p in placeholders):
        raise CompositionError(
            f"config key {key}.prompts: {prompts[0]!r} must name two or more placeholders, e.g. "
            "'a {subject} in {style} style'"
        )
    for template in prompts[1:]:
        found = placeholders_of(template)
        if set(found) != set(placeholders):
            missing, extra = sorted(set(placeholders) - set(found)), sorted(set(found) - set(placeholders))
            raise CompositionError(
                f"config key {key}.prompts: {template!r} has placeholders {found}, the first template "
                f"{placeholders} (missing {missing or 'none'}, extra {extra or 'none'}); every template names the same"
            )
    return Composition(
        name=name,
        set=block["set"],
        prompts=tuple(prompts),
        placeholders=tuple(placeholders),
        groups=tuple(_groups(key, block.get("groups"), placeholders)),
    )


def _groups(key: str, given, placeholders: list[str]) -> list[tuple[int, ...]]:
    if isinstance(given, dict):
        if set(given) != set(placeholders):
            raise CompositionError(
                f"config key {key}.groups: names {sorted(given)}, the prompts' placeholders are {placeholders}"
            )
        groups = list(product(*(given[name] for name in placeholders)))
    else:
        groups = [tuple(group) for group in given or []]
    if not groups:
        raise CompositionError(f"config key {key}.groups: no groups; list positions in the set, e.g. [[1, 2]]")
    for group in groups:
        if len(group) != len(placeholders):
            raise CompositionError(
                f"config key {key}.groups: {list(group)} has {len(group)} positions for {len(placeholders)} "
                f"placeholders {placeholders}"
            )
        if len(set(group)) != len(group):
            raise CompositionError(f"config key {key}.groups: {list(group)} names one concept twice")
    return list(dict.fromkeys(groups))


def parse_compositions(block: dict | None) -> list[Composition]:
    return [parse_composition(name, entry) for name, entry in (block or {}).items()]


def check_positions(composition: Composition, size: int, regime: str) -> None:
    """Every member must be a concept the regime trains on the set (positions 1..size)."""
    for group in composition.groups:
        if min(group) < 1 or max(group) > size:
            raise CompositionError(
                f"config key {composition.key}.groups: {list(group)} names a concept outside 1..{size}, "
                f"the concepts {regime} trains on set {composition.set!r}; use positions in 1..{size}"
            )


# ------------------------------------------------------------------------------ prompts


@dataclass(frozen=True)
class ComposedPrompt:
    composition: str
    group: tuple[int, ...]
    placeholders: tuple[str, ...]
    concepts: tuple[str, ...]
    prompt_index: int
    prompt: str
    plain_prompt: str

    @property
    def label(self) -> str:
        return SEPARATOR.join(str(position) for position in self.group)


def compose_prompt(template: str, placeholders, members) -> tuple[str, str]:
    """(prompt, plain prompt) of one template filled with the member tasks: each placeholder gets
    the member's phrase ("sks star"); the plain prompt has each object's class word in its place."""
    prompt = template.format(**{name: task.identifier for name, task in zip(placeholders, members)})
    plain = prompt
    for task in members:
        plain = task.plain_prompt(plain)
    return prompt, plain


def composed_prompts(compositions: list[Composition], tasks: list, k: int) -> list[ComposedPrompt]:
    """Every prompt of the compositions' groups within the first k of `tasks` (the set's tasks in
    position order)."""
    result = []
    for composition in compositions:
        for group in composition.groups_within(k):
            members = [tasks[position - 1] for position in group]
            for index, template in enumerate(composition.prompts):
                prompt, plain = compose_prompt(template, composition.placeholders, members)
                result.append(
                    ComposedPrompt(
                        composition=composition.name,
                        group=group,
                        placeholders=composition.placeholders,
                        concepts=tuple(task.concept for task in members),
                        prompt_index=index,
                        prompt=prompt,
                        plain_prompt=plain,
                    )
                )
    return result


def read_composition_index(directory):
    """The index of a composition sample directory, with absolute image paths."""
    import pandas as pd

    path = Path(directory) / "index.csv"
    if not path.is_file():
        raise CompositionError(f"{path}: composition index missing; rerun the sampling job that writes {directory}")
    frame = pd.read_csv(path, keep_default_na=False, dtype={"group": str, "positions": str})
    missing = sorted(set(COMPOSITION_COLUMNS) - set(frame.columns))
    if missing:
        raise CompositionError(f"{path}: columns {missing} missing; resample {directory}")
    frame["path"] = [str(Path(directory) / name) for name in frame["path"]]
    return frame


# ------------------------------------------------------------------------------ scores


def write_composition_scores(rows: list, output) -> None:
    import pandas as pd

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(f".{output.name}.tmp")
    pd.DataFrame(rows, columns=list(SCORE_COLUMNS)).to_csv(temporary, index=False, float_format="%.6f")
    temporary.replace(output)


def read_composition_scores(path):
    import pandas as pd

    if not Path(path).is_file():
        raise CompositionError(f"{path}: composition scores missing; rerun the scoring job that writes it")
    return pd.read_csv(path, keep_default_na=False, dtype={"group": str})


# ------------------------------------------------------------------------------ summaries


def member_summary(scores):
    """Per (state, composition, group, prompt, metric): the minimum and the mean over the members
    that the metric scores (a text metric: its one whole-prompt score in both), and each member's
    own score under its placeholder's name. Columns: the keys, ``metric``, ``statistic``
    (``min``, ``mean`` or a placeholder name) and ``score``."""
    import pandas as pd

    keys = [*SCORE_COLUMNS[: SCORE_COLUMNS.index("member")], "metric"]  # a state, group and prompt
    if scores.empty:
        return pd.DataFrame(columns=[*keys, "statistic", "score"])
    grouped = scores.groupby(keys, sort=True)["score"]
    summary = [
        grouped.min().reset_index().assign(statistic="min"),
        grouped.mean().reset_index().assign(statistic="mean"),
    ]
    members = scores[scores["member"] != WHOLE_PROMPT][[*keys, "member", "score"]].rename(
        columns={"member": "statistic"}
    )
    return pd.concat([*summary, members], ignore_index=True)[[*keys, "statistic", "score"]]
