"""The SLURM profile check as a pure function: what rules request against what sinfo reports."""

from __future__ import annotations

from lorachain.cluster_checks import Cluster, RuleRequest, slurm_profile_problems

CLUSTER = Cluster(
    partitions=frozenset({"cpu", "gpu"}),
    has_default_partition=True,
    gres_by_partition={"cpu": "(null)", "gpu": "gpu:h100:4"},
)


def test_a_sound_profile_has_no_problems():
    requests = [
        RuleRequest("train_task", partition="gpu", gpus=1, has_account=True),
        RuleRequest("continual_table", partition=None, has_account=True),
    ]
    assert slurm_profile_problems(requests, CLUSTER, no_account=False) == []


def test_missing_account_names_the_rules_and_the_fix_unless_no_account():
    requests = [
        RuleRequest("train_task", "gpu", 1, has_account=False),
        RuleRequest("prepare_tasks", None, has_account=True),
    ]
    (problem,) = slurm_profile_problems(requests, CLUSTER, no_account=False)
    assert (
        "no SLURM account" in problem and "rules without one: train_task" in problem and "slurm-no-account" in problem
    )
    assert slurm_profile_problems(requests, CLUSTER, no_account=True) == []


def test_unknown_partition_and_no_default_partition():
    problem, gpu = slurm_profile_problems([RuleRequest("train_task", "gpu-a100", 1, True)], CLUSTER, False)
    assert "'gpu-a100' does not exist" in problem and "cpu, gpu" in problem and "requests gpu=1" in gpu
    no_default = Cluster(CLUSTER.partitions, has_default_partition=False, gres_by_partition=CLUSTER.gres_by_partition)
    (problem,) = slurm_profile_problems([RuleRequest("prepare_tasks", None, has_account=True)], no_default, False)
    assert "no slurm_partition" in problem
    # A partition the profile names with an expression only a job can evaluate is left to the job.
    named = RuleRequest("prepare_tasks", None, has_account=True, partition_set=True)
    assert slurm_profile_problems([named], no_default, False) == []


def test_gpu_rules_need_a_gpu_partition():
    (problem,) = slurm_profile_problems([RuleRequest("train_task", "cpu", "1", True)], CLUSTER, False)
    assert "requests gpu=1" in problem and "partition(s) cpu" in problem
    assert (
        slurm_profile_problems([RuleRequest("train_task", None, 2, True)], CLUSTER, False) == []
    )  # some partition has GPUs
    cpu_only = Cluster(frozenset({"cpu"}), True, {"cpu": "(null)"})
    (problem,) = slurm_profile_problems([RuleRequest("train_task", None, 2, True)], cpu_only, False)
    assert "partition(s) cpu" in problem
    assert slurm_profile_problems([RuleRequest("train_task", "cpu", "{resources.gpu}", True)], CLUSTER, False) == []
