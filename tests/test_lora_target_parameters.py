"""LoRA on bare parameters (`target_parameters`): peft's layout both ways, merge, nesting, refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftkit import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model
from peftkit.tuners.lora.param_wrapper import ParamWrapper


class LinearFromParameter(nn.Module):
    """A linear layer whose weight is a bare (in, out) parameter."""

    def __init__(self, fan_in: int, fan_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fan_in, fan_out))
        self.bias = nn.Parameter(torch.ones(fan_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class Experts(nn.Module):
    """A mixture-of-experts block: 3-D stacks, stored (E, out, in) or, with is_transposed, (E, in, out)."""

    def __init__(self, transposed: bool, experts: int = 3, dim: int = 10, hidden: int = 6) -> None:
        super().__init__()
        self.is_transposed = transposed
        shape_up, shape_down = ((experts, dim, hidden), (experts, hidden, dim)) if transposed else ((experts, hidden, dim), (experts, dim, hidden))
        self.gate_up_proj = nn.Parameter(torch.randn(shape_up) / 3)
        self.down_proj = nn.Parameter(torch.randn(shape_down) / 3)

    def _apply(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x @ weight if self.is_transposed else x @ weight.transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply(torch.relu(self._apply(x, self.gate_up_proj)), self.down_proj)


class Model(nn.Module):
    def __init__(self, transposed: bool = False) -> None:
        super().__init__()
        self.lin0 = LinearFromParameter(10, 20)
        self.lin1 = nn.Linear(20, 10)
        self.experts = Experts(transposed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin1(torch.relu(self.lin0(x)))
        return self.experts(y.unsqueeze(0).expand(3, -1, -1))


def _base(transposed: bool = False) -> Model:
    torch.manual_seed(0)
    return Model(transposed)


X = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
ALL = ["lin0.weight", "lin1.weight", "experts.gate_up_proj", "experts.down_proj"]


def _ours(transposed: bool = False, targets=ALL, **kwargs) -> PeftModel:
    torch.manual_seed(2)
    config = LoraConfig(target_parameters=targets, init_lora_weights=False, **kwargs)
    return get_peft_model(_base(transposed), config)


@pytest.mark.parametrize("transposed", [False, True])
def test_adapters_move_both_ways_with_peft(transposed, tmp_path):
    import peft

    torch.manual_seed(2)
    config = peft.LoraConfig(target_parameters=ALL, target_modules=[], init_lora_weights=False)
    theirs = peft.get_peft_model(_base(transposed), config)
    theirs.save_pretrained(tmp_path / "peft")
    ours = PeftModel.from_pretrained(_base(transposed), tmp_path / "peft")
    with torch.no_grad():
        assert not torch.allclose(ours(X), _base(transposed)(X), atol=1e-2)
        assert torch.allclose(ours(X), theirs(X), atol=1e-5)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(_base(transposed), tmp_path / "ours")
    with torch.no_grad():
        assert torch.allclose(back(X), ours(X), atol=1e-5)


@pytest.mark.parametrize("transposed", [False, True])
def test_merge_disable_unload_and_nesting(transposed):
    model = _ours(transposed)
    experts = model.base_model.model.experts
    # two parameters of one module nest: the first one named in the module wraps innermost
    assert isinstance(experts, ParamWrapper) and experts.parameter_name == "down_proj"
    assert isinstance(experts.base_layer, ParamWrapper) and experts.base_layer.parameter_name == "gate_up_proj"
    with torch.no_grad():
        adapted = model(X)
        model.merge_adapter()
        assert torch.allclose(model(X), adapted, atol=1e-4)
        model.unmerge_adapter()
        assert torch.allclose(model(X), adapted, atol=1e-5)
        with model.disable_adapter():
            assert torch.allclose(model(X), _base(transposed)(X), atol=1e-6)
    unloaded = _ours(transposed).unload()
    assert type(unloaded.experts) is Experts and type(unloaded.lin0) is LinearFromParameter
    assert all(torch.equal(a, b) for a, b in zip(unloaded.state_dict().values(), _base(transposed).state_dict().values()))
    merged = _ours(transposed).merge_and_unload()
    assert type(merged.experts) is Experts
    with torch.no_grad():
        assert torch.allclose(merged(X), adapted, atol=1e-4)


def test_training_step_changes_only_adapters_and_the_parameter_is_restored():
    model = _ours()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(X).pow(2).mean().backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n for n in changed)
    assert len(changed) == 2 * len(ALL)  # A and B of every targeted parameter
    experts = model.base_model.model.experts.get_base_layer()
    assert isinstance(experts.gate_up_proj, nn.Parameter) and not experts.gate_up_proj.requires_grad


def test_second_adapter_reuses_the_wrappers_and_switches():
    model = _ours()
    model.add_adapter("other", LoraConfig(target_parameters=ALL, init_lora_weights=False, r=4))
    experts = model.base_model.model.experts
    assert set(experts.r) == {"default", "other"} and set(experts.base_layer.r) == {"default", "other"}
    with torch.no_grad():
        first = model(X)
        model.set_adapter("other")
        assert experts.base_layer.active_adapters == ["other"]  # nested layers follow
        assert not torch.allclose(model(X), first, atol=1e-4)
        model.set_adapter("default")
        assert torch.allclose(model(X), first, atol=1e-6)
    model.delete_adapter("default")
    assert set(experts.base_layer.r) == {"other"}


def test_with_target_modules_on_other_layers():
    model = get_peft_model(_base(), LoraConfig(target_modules=["lin1"], target_parameters=["lin0.weight"]))
    assert type(model.base_model.model.lin1).__name__ == "Linear" and hasattr(model.base_model.model.lin1, "lora_A")
    assert isinstance(model.base_model.model.lin0, ParamWrapper)


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="lora_dropout"):
        _ours(lora_dropout=0.1)
    with pytest.raises(ValueError, match="use_dora"):
        _ours(use_dora=True)
    with pytest.raises(TypeError, match="must be a list of strings"):
        LoraConfig(target_parameters="lin0.weight")
    with pytest.raises(ValueError, match="not a valid target"):
        get_peft_model(_base(), LoraConfig(target_modules=["lin1"], target_parameters=["lin1.weight"]))
    with pytest.raises(ValueError, match="no `target_parameters` found"):
        get_peft_model(_base(), LoraConfig(target_parameters=["nothing.weight"]))
    with pytest.raises(ValueError, match="from a state_dict"):
        inject_adapter_in_model(LoraConfig(target_parameters=["lin0.weight"]), _base(), state_dict={"lin0.lora_A.weight": 0})
    model = _ours()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="same set of parameters"):
        model.add_adapter("other", LoraConfig(target_parameters=["lin0.weight"]))
    assert set(model.peft_config) == {"default"}
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="does not support targeting nn.Parameter"):
        model.add_weighted_adapter(["default"], [1.0], "combined")
    with pytest.raises(ValueError, match="does not support mixed adapter batches"):
        model(X, adapter_names=["default"] * 4)
    holder = nn.Module()
    holder.scale = nn.Parameter(torch.ones(2, 2))
    with pytest.raises(ValueError, match="top-level module"):
        get_peft_model(holder, LoraConfig(target_parameters=["scale"]))
