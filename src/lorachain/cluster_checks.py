"""The SLURM profile check, made before any job is submitted.

Under the SLURM executor the workflow needs an account (or ``slurm-no-account``), partitions that
exist, and a GPU GRES on the partitions of the rules that request a GPU. Without this check the
plugin guesses an account and submits jobs that pend or fail one by one.

:func:`slurm_profile_problems` is a pure function of what each rule requests (:class:`RuleRequest`)
and what the cluster offers (:class:`Cluster`), unit-tested with plain values;
:func:`check_slurm_profile` reads both from a running Snakemake workflow and ``sinfo``.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field


class ClusterCheckError(ValueError):
    """A SLURM profile that would submit jobs that cannot run; the message names the fix."""


@dataclass(frozen=True)
class RuleRequest:
    """What one rule asks of SLURM, after profile overrides and defaults are applied."""

    rule: str
    partition: str | None  # None: the profile sets none for this rule
    gpus: object = 0  # an int, or the text of an expression only a job can evaluate
    has_account: bool = False  # slurm_account set for this rule (by set-resources or default-resources)
    partition_set: bool = False  # slurm_partition named by the profile, with a value only a job can evaluate


@dataclass(frozen=True)
class Cluster:
    """What ``sinfo`` reports."""

    partitions: frozenset[str]
    has_default_partition: bool
    gres_by_partition: dict[str, str] = field(default_factory=dict)


def account_problems(requests: list[RuleRequest], no_account: bool) -> list[str]:
    missing = sorted(request.rule for request in requests if not request.has_account)
    if no_account or not missing:
        return []
    return [
        "no SLURM account: set default-resources.slurm_account in the profile (profiles/slurm/config.yaml; "
        "`sacctmgr -n -s list user $USER format=account` lists yours) or `slurm-no-account: true` "
        f"(rules without one: {', '.join(missing)})"
    ]


def partition_problems(request: RuleRequest, cluster: Cluster) -> list[str]:
    if request.partition is None:
        if cluster.has_default_partition or request.partition_set:
            return []
        return [
            f"{request.rule}: no slurm_partition and the cluster has no default partition; "
            "set one in the profile's set-resources"
        ]
    if request.partition not in cluster.partitions:
        listed = ", ".join(sorted(cluster.partitions))
        return [
            f"{request.rule}: slurm_partition {request.partition!r} does not exist on this cluster "
            f"(sinfo lists {listed})"
        ]
    return []


def gpu_problems(request: RuleRequest, cluster: Cluster) -> list[str]:
    gpus = request.gpus
    if isinstance(gpus, str) and gpus.strip().isdigit():
        gpus = int(gpus)
    if not isinstance(gpus, int) or gpus <= 0:
        return []
    where = [request.partition] if request.partition is not None else sorted(cluster.gres_by_partition)
    if any("gpu" in cluster.gres_by_partition.get(name, "") for name in where):
        return []
    return [
        f"{request.rule} requests gpu={gpus} but no node of partition(s) {', '.join(where) or '(none)'} has a GPU GRES "
        "(sinfo -o '%R %G'); name a GPU partition with slurm_partition in the profile's set-resources"
    ]


def slurm_profile_problems(requests: list[RuleRequest], cluster: Cluster, no_account: bool) -> list[str]:
    problems = account_problems(requests, no_account)
    for request in requests:
        problems += partition_problems(request, cluster) + gpu_problems(request, cluster)
    return problems


# ------------------------------------------------------------------------------ reading Snakemake and sinfo


def resource_names(resources) -> set[str]:
    """Names set in a Snakemake resources mapping (profile default-resources / set-resources)."""
    if resources is None:
        return set()
    try:
        return set(resources.keys())
    except (AttributeError, TypeError):
        return {str(item).split("=", 1)[0] for item in resources}


def resource_value(resources, name: str):
    """A resource's value from a rule's resources or a profile mapping (None if unset; the text of
    an expression that only a job can evaluate)."""
    try:
        resource = resources.get(name)
    except (AttributeError, TypeError):
        return None
    if hasattr(resource, "is_evaluable"):
        try:
            # A profile's strings are kept as expressions; their text is the value for names and counts.
            return getattr(resource, "raw", None) if resource.is_evaluable() else resource.value
        except ValueError:
            return None
    return resource


def first_set(sources, name: str):
    return next((value for value in (resource_value(source, name) for source in sources) if value is not None), None)


def rule_requests(workflow) -> list[RuleRequest]:
    """Each rule's partition, GPU count and account, as the profile and the rule set them."""
    settings = workflow.resource_settings
    defaults = resource_names(settings.default_resources)
    requests = []
    for step in workflow.rules:
        if step.name == "all":
            continue
        override = settings.overwrite_resources.get(step.name)
        sources = (override, step.resources, settings.default_resources)
        partition = first_set(sources, "slurm_partition")
        named = defaults | resource_names(override)
        requests.append(
            RuleRequest(
                rule=step.name,
                partition=partition.strip("'\"") if isinstance(partition, str) else partition,
                gpus=first_set(sources[:2], "gpu") or 0,
                has_account="slurm_account" in named,
                partition_set="slurm_partition" in named,
            )
        )
    return requests


def sinfo(*fields: str) -> str:
    command = ("sinfo", "-h", "-o", " ".join(fields))
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as error:
        raise ClusterCheckError(
            f"SLURM executor: `{' '.join(command)}` failed ({error}); is this a SLURM login node?"
        ) from None


def query_cluster() -> Cluster:
    gres_by_partition: dict[str, str] = {}
    for line in sinfo("%R", "%G").splitlines():
        name, _, gres = line.partition(" ")
        gres_by_partition[name] = gres_by_partition.get(name, "") + gres
    return Cluster(
        partitions=frozenset(sinfo("%R").split()),
        has_default_partition=any(line.strip().endswith("*") for line in sinfo("%P").splitlines()),
        gres_by_partition=gres_by_partition,
    )


def check_slurm_profile(workflow) -> None:
    """Under the SLURM executor only (called from the Snakefile's onstart)."""
    plugin = workflow.executor_plugin
    if plugin is None or plugin.name != "slurm":
        return
    no_account = bool(getattr(workflow.executor_settings, "no_account", False))
    problems = slurm_profile_problems(rule_requests(workflow), query_cluster(), no_account)
    if problems:
        raise ClusterCheckError("SLURM profile check failed before any job was submitted:\n  " + "\n  ".join(problems))
