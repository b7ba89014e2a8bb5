"""A domain's config block -> ordered task list, as the prepare_tasks job runs it."""

import random

import pytest

from lorachain.data import DatasetError, read_tasks
from lorachain.data.domains import generate_synthetic, prepare_tasks, select_domain_tasks


@pytest.mark.parametrize(
    "layout, block",
    [
        ("dreambooth", {"num_tasks": 3, "selection_seed": 42}),
        ("unlearncanvas", {"num_tasks": 3, "selection_seed": 42, "train_images_per_style": 2}),
    ],
)
def test_prepare_tasks_selects_then_orders_by_the_order_seed(tmp_path, layout, block):
    root = generate_synthetic(layout, tmp_path / "data", {"seed": 0, "size": 32, "images_per_concept": 4})
    selected = [task.concept for task in select_domain_tasks(layout, root, block)]
    assert len(selected) == 3
    expected = list(selected)
    random.seed(5)
    random.shuffle(expected)
    tasks = prepare_tasks(layout, root, block, order_seed=5, output=tmp_path / "order5.json", domain="d")
    assert [task.concept for task in tasks] == expected
    assert [task.concept for task in read_tasks(tmp_path / "order5.json")] == expected
    assert all(len(task.train_images) >= 2 and task.reference_images for task in tasks)


def test_explicit_concepts_must_match_num_tasks(tmp_path):
    root = generate_synthetic("dreambooth", tmp_path / "data", {"seed": 0, "size": 32})
    with pytest.raises(DatasetError, match=r"domains\.objects\.concepts lists 1 concepts but the selection needs 3"):
        select_domain_tasks("dreambooth", root, {"num_tasks": 3, "concepts": ["teapot"]}, domain="objects")
    tasks = select_domain_tasks("dreambooth", root, {"num_tasks": 1, "concepts": ["teapot"]}, domain="objects")
    assert [task.concept for task in tasks] == ["teapot"]


@pytest.mark.parametrize("layout", ["dreambooth", "unlearncanvas"])
def test_dataset_errors_name_the_domain_and_its_root_key(tmp_path, layout):
    with pytest.raises(DatasetError) as error:
        select_domain_tasks(layout, tmp_path / "absent", {"num_tasks": 2}, domain="faces")
    message = str(error.value)
    assert message.startswith(f"domain 'faces' (config key domains.faces, dataset.root {tmp_path / 'absent'}): ")
    assert "point domains.faces.dataset.root at" in message and "objects" not in message and "styles" not in message


def test_missing_dataset_root_names_the_path(tmp_path):
    with pytest.raises(DatasetError, match=str(tmp_path / "absent")):
        select_domain_tasks("unlearncanvas", tmp_path / "absent", {"num_tasks": 2})
