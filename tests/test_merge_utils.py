"""peft's task-tensor merging functions (`peft.utils.merge_utils`): each by its formula, the same values as
peft's from the same seed, and `combine` (add_weighted_adapter's entry point) built on them."""

from __future__ import annotations

import pytest
import torch

from peftkit.errors import ConfigError
from peftkit.utils import merge_utils as mu


def _tasks() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(6, 5, generator=generator) for _ in range(3)]


WEIGHTS = torch.tensor([0.5, 1.0, -0.25])


def test_task_arithmetic_and_magnitude_prune_by_formula():
    tasks = _tasks()
    expected = sum(w * t for w, t in zip(WEIGHTS, tasks))
    assert torch.allclose(mu.task_arithmetic(tasks, WEIGHTS), expected)
    pruned = mu.prune(tasks[0], 0.2, method="magnitude")
    assert int((pruned != 0).sum()) == int(0.2 * 30)
    kept = pruned[pruned != 0].abs()
    assert kept.min() >= tasks[0].abs()[pruned == 0].max(), "magnitude pruning keeps the largest entries"


def test_ties_keeps_only_entries_agreeing_with_the_elected_sign():
    tasks = [torch.tensor([1.0, -2.0, 3.0]), torch.tensor([-4.0, -1.0, 1.0])]
    with pytest.warns(UserWarning, match="no pruning"):
        merged = mu.ties(tasks, torch.tensor([1.0, 1.0]), density=1.0)
    # total mass: [-3, -3, 4] -> signs [-, -, +]; entry 0 keeps only -4, entry 1 averages -2, -1, entry 2 averages 3, 1
    assert torch.equal(merged, torch.tensor([-4.0, -1.5, 2.0]))
    mask = mu.calculate_majority_sign_mask(torch.stack(tasks), method="frequency")
    assert mask.tolist() == [[True, True, True], [False, True, True]]


def test_prune_refusals_as_peft():
    with pytest.raises(ValueError, match="Density should be >= 0"):
        mu.prune(torch.ones(3), -0.1, method="magnitude")
    with pytest.raises(ValueError, match="Unknown method"):
        mu.prune(torch.ones(3), 0.5, method="other")
    with pytest.raises(RuntimeError, match="Unimplemented mask method"):
        mu.calculate_majority_sign_mask(torch.ones(2, 3), method="other")
    with pytest.warns(UserWarning, match="no pruning will be performed"):
        assert torch.equal(mu.prune(torch.arange(3.0), 1.0, method="random"), torch.arange(3.0))


@pytest.mark.parametrize("name, extra", [
    ("task_arithmetic", {}), ("magnitude_prune", {"density": 0.4}), ("ties", {"density": 0.4}),
    ("ties", {"density": 0.4, "majority_sign_method": "frequency"}), ("dare_linear", {"density": 0.4}),
    ("dare_ties", {"density": 0.4}),
])
def test_same_values_as_peft_from_the_same_seed(name, extra):
    peft_merge = pytest.importorskip("peft.utils.merge_utils")
    torch.manual_seed(3)
    ours = getattr(mu, name)(_tasks(), WEIGHTS, **extra)
    torch.manual_seed(3)
    theirs = getattr(peft_merge, name)(_tasks(), WEIGHTS, **extra)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("method, function", [
    ("linear", "task_arithmetic"), ("ties", "ties"), ("dare_linear", "dare_linear"), ("dare_ties", "dare_ties"),
    ("magnitude_prune", "magnitude_prune"),
])
def test_combine_is_the_named_function(method, function):
    extra = {} if method == "linear" else {"density": 0.5}
    torch.manual_seed(4)
    combined = mu.combine(_tasks(), WEIGHTS.tolist(), method, **extra)
    torch.manual_seed(4)
    assert torch.equal(combined, getattr(mu, function)(_tasks(), WEIGHTS, **extra))


def test_combine_refuses_bad_arguments_before_computing():
    with pytest.raises(ConfigError, match="Unknown combination"):
        mu.combine(_tasks(), [1, 1, 1], "average")
    with pytest.raises(ConfigError, match="needs density"):
        mu.combine(_tasks(), [1, 1, 1], "ties")
    with pytest.raises(ConfigError, match="majority_sign_method"):
        mu.combine(_tasks(), [1, 1, 1], "ties", density=0.5, majority_sign_method="vote")
