"""Unit tests of the continual methods (lorachain.methods) on hand-made tensors."""

from __future__ import annotations

import math

import pytest

from lorachain.methods import (
    ContinualMethod,
    InitContext,
    LayerAdapter,
    MethodError,
    make_method,
    method_names,
    register_method,
)
from lorachain.methods.base import gaussian_adapter
from lorachain.methods.ortho_init import columnwise_null_vectors, rows_orthogonal_to
from lorachain.torch_env import torch


def ctx(
    *, rank=4, out_features=24, in_features=40, tasks_done=0, merged=None, previous=None, seed=0, scale=0.5, layer="l"
):
    return InitContext(
        layer=layer,
        out_features=out_features,
        in_features=in_features,
        rank=rank,
        scale=scale,
        tasks_done=tasks_done,
        merged=merged,
        previous=previous,
        generator=torch.Generator().manual_seed(seed),
    )


def random_adapter(rank=4, out_features=24, in_features=40, seed=1, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    return LayerAdapter(
        A=torch.randn(rank, in_features, generator=g), B=torch.randn(out_features, rank, generator=g), scale=scale
    )


# -------------------------------------------------------------------------------------- registry


def test_registry_names():
    assert method_names() == ["blocklora", "magmax", "merge_init", "naive", "ortho_init", "orthogonal_adaptation"]
    for name in method_names():
        method = make_method(name)
        assert isinstance(method, ContinualMethod) and method.name == name
    assert [n for n in method_names() if make_method(n).adapter_stays_live] == ["naive"]
    assert make_method("ortho_init").params == {"variant": "columnwise", "init_scale": "gaussian"}
    assert make_method("ortho_init", {"variant": "rowspace"}).params["variant"] == "rowspace"


def test_unknown_method_names_the_key():
    with pytest.raises(MethodError) as info:
        make_method("ewc", key="methods.my_run")
    message = str(info.value)
    assert "methods.my_run" in message and "'ewc'" in message
    for name in method_names():  # lists what is known
        assert name in message


def test_unknown_or_bad_parameter():
    with pytest.raises(MethodError, match=r"methods\.m.*'merge_init'.*\['alpha'\]"):
        make_method("merge_init", {"alpha": 1}, key="methods.m")
    with pytest.raises(MethodError, match="variant"):
        make_method("ortho_init", {"variant": "diagonal"})
    with pytest.raises(MethodError, match="init_scale"):
        make_method("ortho_init", {"init_scale": "huge"})
    with pytest.raises(MethodError, match="threshold"):
        make_method("magmax", {"threshold": 0.1})


def test_register_twice_refused():
    class Duplicate(ContinualMethod):
        name = "naive"

    with pytest.raises(RuntimeError, match="twice"):
        register_method(Duplicate)
    assert make_method("naive").__class__.__name__ == "Naive"


# ------------------------------------------------------------------------------------------ init


def test_gaussian_init_statistics_and_zero_B():
    rank, n, m = 8, 4096, 16
    adapter = gaussian_adapter(ctx(rank=rank, in_features=n, out_features=m, scale=0.25))
    assert adapter.A.shape == (rank, n) and adapter.B.shape == (m, rank)
    assert adapter.A.dtype == torch.float32 and adapter.scale == 0.25
    assert torch.count_nonzero(adapter.B) == 0
    assert abs(adapter.A.std().item() - 1 / rank) < 0.03 / rank  # N(0, (1/r)^2), 32k samples
    assert abs(adapter.A.mean().item()) < 3 / rank / math.sqrt(rank * n)
    assert torch.count_nonzero(adapter.delta()) == 0
    # Seeded: same generator state, same A; another seed, another A.
    assert torch.equal(adapter.A, gaussian_adapter(ctx(rank=rank, in_features=n, out_features=m)).A)
    assert not torch.equal(adapter.A, gaussian_adapter(ctx(rank=rank, in_features=n, out_features=m, seed=1)).A)


@pytest.mark.parametrize("name", ["merge_init", "magmax"])
def test_fresh_methods_ignore_the_past(name):
    previous = random_adapter()
    merged = torch.randn(24, 40)
    method = make_method(name)
    later = method.init_adapter(ctx(tasks_done=2, merged=merged, previous=previous))
    assert torch.equal(later.A, gaussian_adapter(ctx()).A)
    assert torch.count_nonzero(later.B) == 0


def test_naive_init_copies_previous_adapter():
    naive = make_method("naive")
    first = naive.init_adapter(ctx())
    assert torch.equal(first.A, gaussian_adapter(ctx()).A) and torch.count_nonzero(first.B) == 0
    previous = random_adapter(scale=0.5)
    copied = naive.init_adapter(ctx(tasks_done=1, previous=previous, scale=0.5))
    assert torch.equal(copied.A, previous.A) and torch.equal(copied.B, previous.B)
    # A copy, not an alias: training the new adapter must not change the stored previous one.
    copied.A.add_(1.0)
    copied.B.add_(1.0)
    assert not torch.equal(copied.A, previous.A) and not torch.equal(copied.B, previous.B)


# ------------------------------------------------------------------------------------------ fold


def test_merge_and_ortho_fold_is_sum():
    deltas = [torch.randn(6, 5, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    for name in ("merge_init", "ortho_init"):
        method = make_method(name)
        merged = None
        for delta in deltas:
            merged = method.fold(merged, delta)
        torch.testing.assert_close(merged, deltas[0] + deltas[1] + deltas[2], rtol=0, atol=1e-6)
        # The first fold copies: changing the delta afterwards leaves the state alone.
        first = method.fold(None, deltas[0])
        deltas[0].add_(1.0)
        assert not torch.equal(first, deltas[0])
        deltas[0].sub_(1.0)


def test_naive_fold_merges_nothing():
    naive = make_method("naive")
    assert naive.fold(None, torch.ones(3, 3)) is None
    merged = torch.zeros(3, 3)
    assert naive.fold(merged, torch.ones(3, 3)) is merged


def test_magmax_fold_selects_larger_magnitude_ties_to_new():
    magmax = make_method("magmax")
    merged = torch.tensor([[0.5, -2.0, 1.0], [0.0, 3.0, -0.25]])
    delta = torch.tensor([[-0.5, 1.0, -1.5], [0.0, -3.0, 0.1]])
    # (0,0): tie 0.5 vs -0.5 -> new (-0.5); (0,1): old -2; (0,2): new -1.5;
    # (1,0): tie at zero -> new (0); (1,1): tie 3 vs -3 -> new (-3); (1,2): old -0.25.
    expected = torch.tensor([[-0.5, -2.0, -1.5], [0.0, -3.0, -0.25]])
    assert torch.equal(magmax.fold(merged, delta), expected)
    first = magmax.fold(None, delta)
    assert torch.equal(first, delta) and first is not delta


def test_magmax_sequential_keeps_running_maximum_magnitude():
    magmax = make_method("magmax")
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(8, 8, generator=g) * (1 + t) for t in range(4)]
    tau = None
    for delta in deltas:
        tau = magmax.fold(tau, delta)
    stacked = torch.stack(deltas)
    assert torch.equal(tau.abs(), stacked.abs().max(dim=0).values)
    assert not torch.allclose(tau, stacked.sum(0))
    # Every entry is one of the deltas' entries (a selection, no rescaling).
    assert ((stacked == tau).any(dim=0)).all()


# ------------------------------------------------------------------------------------ ortho_init


@pytest.mark.parametrize("rank", [2, 4, 8])
@pytest.mark.parametrize("init_scale", ["gaussian", "unit"])
def test_ortho_columnwise_columns_orthogonal_to_previous(rank, init_scale):
    method = make_method("ortho_init", {"init_scale": init_scale})
    n = 50
    previous = random_adapter(rank=rank, in_features=n, seed=3)
    previous.A[:, 7] = 0.0  # a zero column: any unit vector is orthogonal to it
    adapter = method.init_adapter(
        ctx(rank=rank, in_features=n, tasks_done=1, previous=previous, merged=torch.randn(24, n))
    )
    assert adapter.A.shape == (rank, n) and adapter.A.dtype == torch.float32
    assert torch.count_nonzero(adapter.B) == 0 and adapter.B.shape == (24, rank)
    dots = (adapter.A.double() * previous.A.double()).sum(dim=0)  # dot per column j
    assert dots.abs().max() < 1e-6 * previous.A.abs().max()
    norms = adapter.A.norm(dim=0)
    target = 1 / math.sqrt(rank) if init_scale == "gaussian" else 1.0
    torch.testing.assert_close(norms, torch.full((n,), target), rtol=1e-5, atol=1e-6)
    # Deterministic: it depends on the previous A only, not on the generator.
    again = method.init_adapter(ctx(rank=rank, in_features=n, tasks_done=1, previous=previous, seed=99))
    assert torch.equal(adapter.A, again.A)


def test_ortho_columnwise_null_vectors_helper():
    previous = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    vectors = columnwise_null_vectors(previous)
    assert vectors.shape == (3, 10) and vectors.dtype == torch.float64
    assert ((vectors * previous.double()).sum(0).abs() < 1e-12).all()


def test_ortho_columnwise_first_task_is_gaussian_and_rank1_refused():
    method = make_method("ortho_init")
    first = method.init_adapter(ctx())
    assert torch.equal(first.A, gaussian_adapter(ctx()).A)
    with pytest.raises(MethodError, match="training.rank"):
        method.init_adapter(ctx(rank=1, tasks_done=1, previous=random_adapter(rank=1)))


def _merged_from_tasks(tasks, rank, out_features, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(rank, n, generator=g) for _ in range(tasks)]
    Bs = [torch.randn(out_features, rank, generator=g) for _ in range(tasks)]  # full rank
    merged = sum(B @ A for A, B in zip(As, Bs))
    return merged, As


@pytest.mark.parametrize("init_scale", ["gaussian", "unit"])
@pytest.mark.parametrize("tasks_done", [1, 2, 4])
def test_ortho_rowspace_orthogonal_to_all_previous_tasks(init_scale, tasks_done):
    rank, n, m = 4, 20, 32
    assert (tasks_done + 1) * rank <= n
    merged, As = _merged_from_tasks(tasks_done, rank, m, n)
    method = make_method("ortho_init", {"variant": "rowspace", "init_scale": init_scale})
    adapter = method.init_adapter(
        ctx(
            rank=rank,
            out_features=m,
            in_features=n,
            tasks_done=tasks_done,
            merged=merged,
            previous=random_adapter(rank, m, n),
        )
    )
    A = adapter.A.double()
    assert adapter.A.shape == (rank, n) and torch.count_nonzero(adapter.B) == 0
    row_norm2 = n / rank**2 if init_scale == "gaussian" else 1.0  # Gaussian's expected Frobenius norm n / r
    torch.testing.assert_close(A @ A.T, row_norm2 * torch.eye(rank, dtype=torch.float64), rtol=0, atol=1e-5 * row_norm2)
    for previous_A in As:
        overlap = A @ previous_A.double().T
        assert overlap.abs().max() < 1e-4 * A.norm() * previous_A.norm(), overlap.abs().max()


def test_ortho_rowspace_when_rank_does_not_allow():
    rank, n, m, tasks_done = 4, 10, 16, 3  # 3 * 4 + 4 > 10: only n - r = 6 directions can be avoided
    merged, As = _merged_from_tasks(tasks_done, rank, m, n, seed=5)
    assert torch.linalg.matrix_rank(merged) == n
    method = make_method("ortho_init", {"variant": "rowspace", "init_scale": "unit"})
    adapter = method.init_adapter(ctx(rank=rank, out_features=m, in_features=n, tasks_done=tasks_done, merged=merged))
    A = adapter.A.double()
    torch.testing.assert_close(A @ A.T, torch.eye(rank, dtype=torch.float64), rtol=0, atol=1e-6)
    _, _, vh = torch.linalg.svd(merged.double())
    top = vh[: n - rank]
    assert (A @ top.T).abs().max() < 1e-6
    # So the new rows span exactly the r weakest merged directions.
    weakest = vh[n - rank :]
    torch.testing.assert_close(
        (A @ weakest.T).abs().pow(2).sum(1), torch.ones(rank, dtype=torch.float64), rtol=0, atol=1e-6
    )


def test_ortho_rowspace_first_task_gaussian_and_seeded():
    method = make_method("ortho_init", {"variant": "rowspace"})
    first = method.init_adapter(ctx(merged=None))
    assert torch.equal(first.A, gaussian_adapter(ctx()).A)
    merged, _ = _merged_from_tasks(1, 4, 24, 40)
    a = rows_orthogonal_to(merged, 4, 1, torch.Generator().manual_seed(0))
    b = rows_orthogonal_to(merged, 4, 1, torch.Generator().manual_seed(0))
    c = rows_orthogonal_to(merged, 4, 1, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, c)
