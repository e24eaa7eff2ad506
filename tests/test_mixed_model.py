"""`PeftMixedModel` (`mixed=True`): LoRA, LoHa, LoKr, AdaLoRA, OFT and SHiRA adapters on one model, as peft combines them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit
from peftkit import PeftMixedModel, get_peft_model


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.relu(self.lin0(x)))


def _base() -> MLP:
    torch.manual_seed(0)
    return MLP()


X = torch.randn(4, 10, generator=torch.Generator().manual_seed(3))
CONFIGS = {
    "lora": ("LoraConfig", dict(target_modules=["lin0", "lin1"], init_lora_weights=False)),
    "loha": ("LoHaConfig", dict(target_modules=["lin0"], init_weights=False)),
    "lokr": ("LoKrConfig", dict(target_modules=["lin1", "lin0"], init_weights=False)),
}


def _config(library, name):
    cls, kwargs = CONFIGS[name]
    return getattr(library, cls)(**kwargs)


def _mixed(library):
    torch.manual_seed(1)
    model = library.get_peft_model(_base(), _config(library, "lora"), "lora", mixed=True)
    for name in ("loha", "lokr"):
        model.add_adapter(name, _config(library, name))
    model.set_adapter(["lora", "loha", "lokr"])
    return model


def _out(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


def test_same_layout_and_outputs_as_peft_mixed_model():
    import peft

    theirs, ours = _mixed(peft), _mixed(peftkit)
    assert isinstance(ours, PeftMixedModel)
    assert set(ours.state_dict()) == set(theirs.state_dict())  # the same nesting, key for key
    ours.load_state_dict(theirs.state_dict())
    assert torch.allclose(_out(ours), _out(theirs), atol=1e-6)
    assert not torch.allclose(_out(ours), _out(_base()), atol=1e-3)


def test_updates_add_up_disable_merge_and_unload():
    model = _mixed(peftkit)
    total = _out(model) - _out(_base())
    singles = []
    for name in CONFIGS:
        model.set_adapter(name)
        singles.append(_out(model) - _out(_base()))
    model.set_adapter(list(CONFIGS))
    # lin1 sees lin0's output, so the sum is only exact per layer; check lin0's layer output directly
    lin0 = model.base_model.model.lin0
    with torch.no_grad():
        model.set_adapter(list(CONFIGS))
        combined = lin0(X) - lin0.get_base_layer()(X)
        parts = []
        for name in CONFIGS:
            model.set_adapter(name)
            parts.append(lin0(X) - lin0.get_base_layer()(X))
    assert torch.allclose(combined, sum(parts), atol=1e-5)
    assert all(not torch.allclose(s, torch.zeros_like(s)) for s in singles) and total.abs().sum() > 0
    model.set_adapter(list(CONFIGS))
    adapted = _out(model)
    with model.disable_adapter():
        assert torch.allclose(_out(model), _out(_base()), atol=1e-6)
    merged = model.merge_and_unload()
    assert type(merged.lin0) is nn.Linear and type(merged.lin1) is nn.Linear
    assert torch.allclose(_out(merged), adapted, atol=1e-5)


def test_training_reaches_every_active_adapter_only():
    model = _mixed(peftkit)
    model.set_adapter(["lora", "lokr"])
    model(X).pow(2).mean().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert any("lora_" in n for n in trained) and any("lokr_" in n for n in trained)
    assert not any("hada_" in n for n in trained)  # LoHa is not active
    assert all(("lora_" in n or "lokr_" in n) for n in trained)


def test_adapters_from_single_method_folders_load_as_in_peft(tmp_path):
    import peft

    for name in CONFIGS:  # each adapter trained and saved on its own, as usual
        torch.manual_seed(5)
        single = get_peft_model(_base(), _config(peftkit, name))
        single.save_pretrained(tmp_path / name)
    ours = PeftMixedModel.from_pretrained(_base(), tmp_path / "lora", adapter_name="lora")
    theirs = peft.PeftMixedModel.from_pretrained(_base(), str(tmp_path / "lora"), adapter_name="lora")
    for name in ("loha", "lokr"):
        ours.load_adapter(str(tmp_path / name), name)
        theirs.load_adapter(str(tmp_path / name), name)
    ours.set_adapter(list(CONFIGS))
    theirs.set_adapter(list(CONFIGS))
    assert torch.allclose(_out(ours), _out(theirs), atol=1e-6)
    assert not torch.allclose(_out(ours), _out(_base()), atol=1e-3)


def test_delete_and_refusals():
    model = _mixed(peftkit)
    model.delete_adapter("loha")
    assert set(model.peft_config) == {"lora", "lokr"}
    assert not any("hada_" in n for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match="not compatible with the `PeftMixedModel`"):
        model.add_adapter("ia3", peftkit.IA3Config(target_modules=["lin0"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("lora", _config(peftkit, "lora"))
    with pytest.raises(NotImplementedError, match="Saving is not supported for PeftMixedModel"):
        model.save_pretrained("unused")
    assert set(model.peft_config) == {"lora", "lokr"}


def _four_methods(library):
    """SHiRA first on lin0 (it refuses nested bases), then LoRA, OFT and AdaLoRA wrapping what is there."""
    torch.manual_seed(1)
    model = library.get_peft_model(_base(), library.ShiraConfig(r=2, target_modules=["lin0"], init_weights=False),
                                   "shira", mixed=True)
    model.add_adapter("lora", library.LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False))
    model.add_adapter("oft", library.OFTConfig(target_modules=["lin0"], oft_block_size=4, init_weights=False))
    model.add_adapter("adalora", library.AdaLoraConfig(init_r=4, target_r=2, target_modules=["lin1", "lin0"],
                                                       init_lora_weights=False, total_step=10))
    model.set_adapter(["shira", "lora", "oft", "adalora"])
    return model


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_adalora_oft_and_shira_mix_as_in_peft():
    import peft

    theirs, ours = _four_methods(peft), _four_methods(peftkit)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    adapted = _out(ours)
    assert torch.allclose(adapted, _out(theirs), atol=1e-5)
    assert not torch.allclose(adapted, _out(_base()), atol=1e-3)
    with ours.disable_adapter():
        assert torch.allclose(_out(ours), _out(_base()), atol=1e-6)
    merged = ours.merge_and_unload()
    assert type(merged.lin0) is nn.Linear
    assert torch.allclose(_out(merged), adapted, atol=1e-4)
    late = peftkit.get_peft_model(_base(), _config(peftkit, "lora"), "lora", mixed=True)
    with pytest.raises(ValueError, match="SHiRA does not support nested base layers"):
        late.add_adapter("shira", peftkit.ShiraConfig(r=2, target_modules=["lin0"], init_weights=False))
    assert set(late.peft_config) == {"lora"}
