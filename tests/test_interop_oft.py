"""OFT checkpoints move between peft and peftkit: same keys, shapes, config, logits.

peft is a test-only dependency; the module is skipped without it. Every adapter is initialised
randomly (`init_weights=False`) or trained for a few steps, so an adapter that is not loaded, or
loaded into the wrong place, changes the outputs and the test fails.

Conv2d: peft 0.21.2's unmerged Conv2d forward rotates patches of the input and folds them back
(`F.fold` sums overlapping patches), which agrees with its own merged weight `W R^T` only when
each output sees a patch that overlaps no other: 1x1 kernels, or an input exactly the kernel's
size without padding. The logit cases stay there; elsewhere peftkit computes `conv(x, W R^T)`
(merged == unmerged) and the merged weights of both libraries agree (tested below).
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open
from torch import nn

peft = pytest.importorskip("peft")

import peftkit  # noqa: E402
from tests.interop_helpers import output, read_config, read_weights  # noqa: E402
from tests.tiny_models import MODEL_FACTORIES  # noqa: E402

pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning")

LIBS = {"peft": peft, "peftkit": peftkit}
DIRECTIONS = [("peft", "peftkit"), ("peftkit", "peft")]
ATOL = 1e-5


class MixedNet(nn.Module):
    """Embedding, Linear, a 1x1 Conv2d and a 3x3 Conv2d that sees exactly one 3x3 patch."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(30, 16)
        self.lin = nn.Linear(16, 12)
        self.pointwise = nn.Conv2d(4, 6, kernel_size=1)
        self.patch = nn.Conv2d(6, 8, kernel_size=3)
        self.head = nn.Linear(8 + 12, 5)

    def forward(self, ids: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        text = torch.relu(self.lin(self.emb(ids))).mean(1)
        image = self.patch(torch.relu(self.pointwise(img))).flatten(1)
        return self.head(torch.cat([text, image], dim=1))


MIXED_TARGETS = ["emb", "lin", "pointwise", "patch", "head"]
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]

# name -> (model, config overrides)
CASES = {
    "llama-block8": ("llama", {"oft_block_size": 8}),
    "llama-r4-exact": ("llama", {"r": 4, "oft_block_size": 0, "use_cayley_neumann": False}),
    "llama-block-share": ("llama", {"oft_block_size": 8, "block_share": True}),
    "llama-coft": ("llama", {"oft_block_size": 8, "coft": True, "eps": 1e-2}),
    "llama-neumann3": ("llama", {"oft_block_size": 4, "num_cayley_neumann_terms": 3}),
    "llama-adjusted": ("llama", {"oft_block_size": 32}),  # down_proj (in 48): adjusted to 24
    "llama-layers": ("llama", {"oft_block_size": 8, "layers_to_transform": [1], "layers_pattern": "layers"}),
    "llama-bf16": ("llama-bf16", {"oft_block_size": 8}),
    "bert": ("bert", {"oft_block_size": 8, "target_modules": ["query", "value", "dense"]}),
    "t5": ("t5", {"oft_block_size": 8, "target_modules": ["q", "v", "wo"]}),
    "mixed": ("mixed", {"oft_block_size": 4}),
    "mixed-r2-share": ("mixed", {"r": 2, "oft_block_size": 0, "block_share": True}),
}


def make_model(name: str) -> nn.Module:
    if name == "mixed":
        return MixedNet().eval()
    if name.endswith("-bf16"):
        return MODEL_FACTORIES[name.removesuffix("-bf16")].make_model().to(torch.bfloat16)
    return MODEL_FACTORIES[name].make_model()


def make_inputs(name: str) -> dict:
    if name == "mixed":
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 30, (2, 6), generator=generator)
        return {"ids": ids, "img": torch.randn(2, 4, 3, 3, generator=generator)}
    return MODEL_FACTORIES[name.removesuffix("-bf16")].make_inputs()


def config_kwargs(model_name: str, overrides: dict) -> dict:
    arch = model_name.removesuffix("-bf16")
    kwargs: dict = {"init_weights": False}
    if arch == "mixed":
        kwargs["target_modules"] = MIXED_TARGETS
    else:
        kwargs.update(task_type=MODEL_FACTORIES[arch].task_type, target_modules=LLAMA_TARGETS)
    kwargs.update(overrides)
    return kwargs


def wrap(lib_name: str, case: str):
    model_name, overrides = CASES[case]
    lib = LIBS[lib_name]
    config = lib.OFTConfig(**config_kwargs(model_name, overrides))
    torch.manual_seed(1234)
    return lib.get_peft_model(make_model(model_name), config).eval()


def normalised(config: dict) -> dict:
    config = dict(config)
    config.pop("peft_version")
    for key in ("target_modules", "modules_to_save", "exclude_modules"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    return config


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize(
    ("case", "src_name", "dst_name"),
    [pytest.param(c, s, d, id=f"{c}-{s}->{d}") for c in CASES for s, d in DIRECTIONS],
)
def test_adapter_roundtrip_gives_same_logits(case, src_name, dst_name, tmp_path):
    model_name = CASES[case][0]
    src = wrap(src_name, case)
    inputs = make_inputs(model_name)
    expected = output(src, inputs)
    assert (expected.float() - output(make_model(model_name), inputs).float()).abs().max() > 1e-3, "vacuous adapter"
    src.save_pretrained(str(tmp_path))

    loaded = LIBS[dst_name].PeftModel.from_pretrained(make_model(model_name), str(tmp_path)).eval()
    assert type(loaded).__name__ == type(src).__name__
    torch.testing.assert_close(output(loaded, inputs), expected, atol=ATOL, rtol=0)
    in_file = read_weights(tmp_path)
    in_model = LIBS[dst_name].get_peft_model_state_dict(loaded)
    assert sorted(in_model) == sorted(in_file)
    for key, tensor in in_file.items():
        torch.testing.assert_close(in_model[key], tensor, atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_and_config_parity(case, tmp_path):
    """Both libraries write the same tensor keys, shapes and dtypes, and the same adapter_config.json."""
    models, dirs = {}, {}
    for lib_name in LIBS:
        models[lib_name] = wrap(lib_name, case)
        dirs[lib_name] = tmp_path / lib_name
        models[lib_name].save_pretrained(str(dirs[lib_name]))
    theirs, ours = read_weights(dirs["peft"]), read_weights(dirs["peftkit"])

    def layout(tensors: dict) -> dict:
        return {key: (tuple(tensor.shape), tensor.dtype) for key, tensor in tensors.items()}

    assert layout(ours) == layout(theirs)
    assert any(".oft_R.weight" in key for key in ours)
    with safe_open(os.path.join(dirs["peftkit"], "adapter_model.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    config_theirs, config_ours = read_config(dirs["peft"]), read_config(dirs["peftkit"])
    assert sorted(config_ours) == sorted(config_theirs)
    assert normalised(config_ours) == normalised(config_theirs)
    assert config_ours["peft_type"] == "OFT" and config_ours["peft_version"] == "0.21.2@peftkit"
    counts = {name: model.get_nb_trainable_parameters() for name, model in models.items()}
    assert counts["peftkit"] == counts["peft"]


@pytest.mark.parametrize("direction", DIRECTIONS, ids=lambda d: f"{d[0]}->{d[1]}")
def test_trained_adapter_moves_across(direction, tmp_path):
    """A few optimizer steps (identity init, as users train) in one library, logits equal in the other."""
    src_name, dst_name = direction
    lib = LIBS[src_name]
    config = lib.OFTConfig(oft_block_size=8, target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM")
    torch.manual_seed(0)
    model = lib.get_peft_model(make_model("llama"), config)
    inputs = make_inputs("llama")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for _ in range(3):
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    expected = output(model, inputs)
    assert (expected - output(make_model("llama"), inputs)).abs().max() > 1e-3
    model.save_pretrained(str(tmp_path))
    loaded = LIBS[dst_name].PeftModel.from_pretrained(make_model("llama"), str(tmp_path)).eval()
    torch.testing.assert_close(output(loaded, inputs), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", ["llama-block8", "llama-r4-exact", "llama-coft", "mixed"])
def test_merge_and_unload_parity(case, tmp_path):
    model_name = CASES[case][0]
    src = wrap("peft", case)
    src.save_pretrained(str(tmp_path))
    inputs = make_inputs(model_name)
    unmerged = output(src, inputs)
    merged = {}
    for lib_name, lib in LIBS.items():
        loaded = lib.PeftModel.from_pretrained(make_model(model_name), str(tmp_path))
        with torch.no_grad():
            merged[lib_name] = loaded.merge_and_unload().eval()
    theirs, ours = merged["peft"].state_dict(), merged["peftkit"].state_dict()
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=ATOL, rtol=0, msg=key)
    torch.testing.assert_close(output(merged["peftkit"], inputs), unmerged, atol=1e-4, rtol=0)


def test_padded_conv_merged_weights_agree_and_peftkit_forward_matches_them(tmp_path):
    """Documents the one difference: a 3x3 padded conv on a larger input (see the module docstring)."""
    def conv_net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, stride=2, padding=1)).eval()

    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    config = {"target_modules": ["0", "2"], "r": 3, "oft_block_size": 0}
    with torch.no_grad():
        # peft's fresh (identity) adapter already moves this output; ours does not.
        base_out = conv_net()(x)
        assert not torch.allclose(peft.get_peft_model(conv_net(), peft.OFTConfig(**config))(x), base_out, atol=1e-3)
        torch.testing.assert_close(peftkit.get_peft_model(conv_net(), peftkit.OFTConfig(**config))(x), base_out)
        src = peft.get_peft_model(conv_net(), peft.OFTConfig(init_weights=False, **config))
        src.save_pretrained(str(tmp_path))
        ours = peftkit.PeftModel.from_pretrained(conv_net(), str(tmp_path)).eval()
        unmerged_ours = ours(x)
        merged_ours = ours.merge_and_unload()
        merged_theirs = src.merge_and_unload()
        for key, value in merged_theirs.state_dict().items():
            torch.testing.assert_close(merged_ours.state_dict()[key], value, atol=ATOL, rtol=0, msg=key)
        torch.testing.assert_close(merged_ours(x), unmerged_ours, atol=1e-5, rtol=0)
        torch.testing.assert_close(merged_theirs(x), unmerged_ours, atol=1e-5, rtol=0)


def test_both_refuse_transformers_conv1d():
    kwargs = {"oft_block_size": 8, "target_modules": ["c_attn"]}
    with pytest.raises((TypeError, ValueError)):
        peft.get_peft_model(make_model("gpt2"), peft.OFTConfig(**kwargs))
    with pytest.raises(ValueError):
        peftkit.get_peft_model(make_model("gpt2"), peftkit.OFTConfig(**kwargs))
