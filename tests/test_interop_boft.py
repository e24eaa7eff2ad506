"""BOFT checkpoints move between peft and peftkit: same keys, shapes, config, logits.

peft is a test-only dependency; the module is skipped without it. Every adapter is initialised
randomly (`init_weights=False`) or trained for a few steps, so an adapter that is not loaded, or
loaded into the wrong place, changes the outputs and the test fails.

peft 0.21.2 builds a CUDA extension (`fbd`) for BOFT; without it (any CPU machine) it silently
trains with one butterfly factor whatever `boft_n_butterfly_factor` says. peftkit always uses the
configured number. Cases with several factors therefore run peft "with its extension": the
`with_fbd` fixture stands in for the compiled kernel with `torch.block_diag` (what the kernel
computes), so peft takes its real multi-factor path. Checkpoints peft writes without the extension
(one factor, config saying more) load in peftkit as they were trained (tested below).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from safetensors import safe_open
from torch import nn

peft = pytest.importorskip("peft")
peft_boft_layer = pytest.importorskip("peft.tuners.boft.layer")

import peftkit  # noqa: E402
from tests.interop_helpers import output, read_config, read_weights  # noqa: E402
from tests.tiny_models import MODEL_FACTORIES  # noqa: E402

pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning")

LIBS = {"peft": peft, "peftkit": peftkit}
DIRECTIONS = [("peft", "peftkit"), ("peftkit", "peft")]
ATOL = 1e-5


class _BlockDiag:
    """What peft's CUDA `FastBlockDiag` computes: (N, D, H, H) -> (N, D * H, D * H) block-diagonal."""

    @staticmethod
    def apply(blocks: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.block_diag(*factor) for factor in blocks])


@pytest.fixture
def with_fbd(monkeypatch):
    """peft as on a machine where its BOFT CUDA extension builds (see the module docstring)."""
    monkeypatch.setattr(peft_boft_layer, "get_fbd_cuda", lambda: object())
    monkeypatch.setattr(peft_boft_layer, "FastBlockDiag", _BlockDiag)


class MixedNet(nn.Module):
    """Linear layers around a padded, strided 3x3 Conv2d (in_channels * 9 = 36 rotated features)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(16, 12)
        self.conv = nn.Conv2d(4, 8, kernel_size=3, padding=1, stride=2)
        self.head = nn.Linear(12 + 8, 5)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        image = torch.relu(self.conv(img)).mean((2, 3))
        return self.head(torch.cat([torch.relu(self.lin(x)), image], dim=1))


MIXED_TARGETS = ["lin", "conv", "head"]
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]

# name -> (model, config overrides, needs peft's extension)
CASES = {
    "llama-block4": ("llama", {"boft_block_size": 4}, False),
    "llama-num4": ("llama", {"boft_block_size": 0, "boft_block_num": 4}, False),
    "llama-butterfly2": ("llama", {"boft_block_size": 4, "boft_n_butterfly_factor": 2}, True),
    "llama-butterfly3-num": ("llama", {"boft_block_size": 0, "boft_block_num": 4, "boft_n_butterfly_factor": 3}, True),
    "llama-layers": ("llama", {"boft_block_size": 8, "layers_to_transform": [1], "layers_pattern": "layers"}, False),
    "llama-bf16": ("llama-bf16", {"boft_block_size": 8}, False),
    "bert": ("bert", {"boft_block_size": 8, "target_modules": ["query", "value", "dense"]}, False),
    "t5": ("t5", {"boft_block_size": 8, "target_modules": ["q", "v", "wo"]}, False),
    "mixed": ("mixed", {"boft_block_size": 2}, False),
    "mixed-butterfly2": ("mixed", {"boft_block_size": 2, "boft_n_butterfly_factor": 2}, True),
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
        return {"x": torch.randn(2, 16, generator=generator), "img": torch.randn(2, 4, 7, 7, generator=generator)}
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
    model_name, overrides, _ = CASES[case]
    lib = LIBS[lib_name]
    config = lib.BOFTConfig(**config_kwargs(model_name, overrides))
    torch.manual_seed(1234)
    return lib.get_peft_model(make_model(model_name), config).eval()


def normalised(config: dict) -> dict:
    config = dict(config)
    config.pop("peft_version")
    for key in ("target_modules", "modules_to_save", "exclude_modules"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    return config


@pytest.fixture
def case_setup(request):
    """Parametrised by case name: installs the extension stand-in when the case needs it."""
    case = request.param
    if CASES[case][2]:
        request.getfixturevalue("with_fbd")
    return case


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize(
    ("case_setup", "src_name", "dst_name"),
    [pytest.param(c, s, d, id=f"{c}-{s}->{d}") for c in CASES for s, d in DIRECTIONS],
    indirect=["case_setup"],
)
def test_adapter_roundtrip_gives_same_logits(case_setup, src_name, dst_name, tmp_path):
    case = case_setup
    model_name = CASES[case][0]
    src = wrap(src_name, case)
    inputs = make_inputs(model_name)
    expected = output(src, inputs)
    assert (expected.float() - output(make_model(model_name), inputs).float()).abs().max() > 1e-3, "vacuous adapter"
    src.save_pretrained(str(tmp_path))

    loaded = LIBS[dst_name].PeftModel.from_pretrained(make_model(model_name), str(tmp_path)).eval()
    assert type(loaded).__name__ == type(src).__name__
    if model_name.endswith("-bf16"):
        # peft rotates in bf16, peftkit in fp32: they may differ by bf16 rounding, no more than either
        # differs from the same adapter computed in fp32 over the same (bf16-rounded) base weights.
        exact = LIBS[dst_name].PeftModel.from_pretrained(make_model(model_name).float(), str(tmp_path)).eval()
        noise = (output(exact, inputs) - expected.float()).abs().max()
        assert (output(loaded, inputs).float() - expected.float()).abs().max() <= 2 * noise
    else:
        torch.testing.assert_close(output(loaded, inputs), expected, atol=ATOL, rtol=0)
    in_file = read_weights(tmp_path)
    in_model = LIBS[dst_name].get_peft_model_state_dict(loaded)
    assert sorted(in_model) == sorted(in_file)
    for key, tensor in in_file.items():
        torch.testing.assert_close(in_model[key], tensor, atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("case_setup", list(CASES), indirect=True)
def test_checkpoint_and_config_parity(case_setup, tmp_path):
    """Both libraries write the same tensor keys, shapes and dtypes, and the same adapter_config.json."""
    case = case_setup
    models, dirs = {}, {}
    for lib_name in LIBS:
        models[lib_name] = wrap(lib_name, case)
        dirs[lib_name] = tmp_path / lib_name
        models[lib_name].save_pretrained(str(dirs[lib_name]))
    theirs, ours = read_weights(dirs["peft"]), read_weights(dirs["peftkit"])

    def layout(tensors: dict) -> dict:
        return {key: (tuple(tensor.shape), tensor.dtype) for key, tensor in tensors.items()}

    assert layout(ours) == layout(theirs)
    assert any(key.endswith(".boft_R") for key in ours) and any(key.endswith(".boft_s") for key in ours)
    assert not any("boft_P" in key for key in ours)
    with safe_open(os.path.join(dirs["peftkit"], "adapter_model.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    config_theirs, config_ours = read_config(dirs["peft"]), read_config(dirs["peftkit"])
    assert sorted(config_ours) == sorted(config_theirs)
    assert normalised(config_ours) == normalised(config_theirs)
    assert config_ours["peft_type"] == "BOFT" and config_ours["peft_version"] == "0.21.2@peftkit"
    counts = {name: model.get_nb_trainable_parameters() for name, model in models.items()}
    assert counts["peftkit"] == counts["peft"]


@pytest.mark.parametrize("direction", DIRECTIONS, ids=lambda d: f"{d[0]}->{d[1]}")
@pytest.mark.parametrize("factors", [1, 2])
def test_trained_adapter_moves_across(direction, factors, tmp_path, request):
    """A few optimizer steps (identity init, as users train) in one library, logits equal in the other."""
    if factors > 1:
        request.getfixturevalue("with_fbd")
    src_name, dst_name = direction
    lib = LIBS[src_name]
    config = lib.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=factors, target_modules=LLAMA_TARGETS,
                            task_type="CAUSAL_LM")
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


@pytest.mark.parametrize("case_setup", ["llama-block4", "llama-butterfly2", "mixed", "mixed-butterfly2"], indirect=True)
def test_merge_and_unload_parity(case_setup, tmp_path):
    case = case_setup
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


def test_peft_without_extension_checkpoint_loads_as_trained(tmp_path):
    """peft without `fbd` saves one factor under a config saying 2: peftkit follows the tensors, warns, and
    writes the checkpoint back in the same layout (which that peft loads again)."""
    config = peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=LLAMA_TARGETS,
                             init_weights=False, task_type="CAUSAL_LM")
    torch.manual_seed(7)
    src = peft.get_peft_model(make_model("llama"), config).eval()
    assert not src.base_model.model.model.layers[0].self_attn.q_proj.fbd_cuda_available
    inputs = make_inputs("llama")
    expected = output(src, inputs)
    src.save_pretrained(str(tmp_path / "peft"))
    assert read_weights(tmp_path / "peft")["base_model.model.model.layers.0.self_attn.q_proj.boft_R"].shape[0] == 1
    with pytest.warns(UserWarning, match=r"holds 1 butterfly factor\(s\) per layer but its config says "
                                         r"boft_n_butterfly_factor=2"):
        loaded = peftkit.PeftModel.from_pretrained(make_model("llama"), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(output(loaded, inputs), expected, atol=ATOL, rtol=0)
    assert loaded.peft_config["default"].boft_n_butterfly_factor == 2  # the config is kept as saved
    on_meta = peftkit.PeftModel.from_pretrained(make_model("llama"), str(tmp_path / "peft"), low_cpu_mem_usage=True)
    torch.testing.assert_close(output(on_meta.eval(), inputs), expected, atol=ATOL, rtol=0)
    loaded.save_pretrained(str(tmp_path / "ours"))
    assert read_config(tmp_path / "ours")["boft_n_butterfly_factor"] == 2
    again = peft.PeftModel.from_pretrained(make_model("llama"), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(output(again, inputs), expected, atol=ATOL, rtol=0)


def test_butterfly_maths_matches_peft_dense_construction():
    """Our permutations equal peft's `block_butterfly_perm`, and x R equals peft's dense P B P^T product."""
    from peftkit.tuners.boft import butterfly

    layer_cls = peft_boft_layer.BOFTLayer
    for n, blocks, factors in [(32, 16, 3), (32, 8, 3), (72, 36, 3), (20, 2, 2), (48, 6, 2)]:
        size = n // blocks
        params = torch.randn(factors, blocks, size, size, generator=torch.Generator().manual_seed(n)) * 0.3
        rotations = butterfly.cayley_blocks(params)
        theirs_rotations = layer_cls.cayley_batch(None, params.view(-1, size, size)).view(params.shape)
        torch.testing.assert_close(rotations, theirs_rotations, atol=1e-6, rtol=0)
        perms = [layer_cls.block_butterfly_perm(None, n, blocks // 2**i, size // 2, factors - 1) for i in range(factors)]
        for level, perm in enumerate(perms):
            assert torch.equal(butterfly.butterfly_permutation(n, size, level), perm)
        dense = None
        for level, perm in enumerate(perms):
            permutation = layer_cls.perm2mat(None, perm)
            factor = permutation @ torch.block_diag(*rotations[level]) @ permutation.T
            dense = factor if dense is None else factor @ dense
        x = torch.randn(3, n)
        torch.testing.assert_close(butterfly.butterfly_rows(x, rotations), x @ dense, atol=1e-5, rtol=0)
        torch.testing.assert_close(butterfly.butterfly_rows(x, rotations, transpose=True), x @ dense.T, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "overrides",
    [
        {"boft_block_size": 5},  # 32 % 5
        {"boft_block_size": 0, "boft_block_num": 3},  # 32 % 3
        {"boft_block_size": 0, "boft_block_num": 2, "boft_n_butterfly_factor": 3},  # 2 > log2(2)
        {"boft_block_size": 16, "boft_n_butterfly_factor": 3},  # 32 < 16 * 4
    ],
)
def test_both_refuse_the_same_block_layouts(overrides, with_fbd):
    """peft with its extension and peftkit reject the same geometries with the same messages."""
    messages = []
    for lib in LIBS.values():
        config = lib.BOFTConfig(target_modules=["q_proj"], **overrides)
        with pytest.raises(ValueError) as info:
            lib.get_peft_model(make_model("llama"), config)
        messages.append(str(info.value))
    assert messages[0] == messages[1]


def test_both_refuse_transformers_conv1d():
    kwargs = {"boft_block_size": 4, "target_modules": ["c_attn"]}
    with pytest.raises((TypeError, ValueError)):
        peft.get_peft_model(make_model("gpt2"), peft.BOFTConfig(**kwargs))
    with pytest.raises(ValueError):
        peftkit.get_peft_model(make_model("gpt2"), peftkit.BOFTConfig(**kwargs))


def test_config_fields_and_defaults_match_peft():
    import dataclasses

    ours = {f.name: f.default for f in dataclasses.fields(peftkit.BOFTConfig)}
    theirs = {f.name: f.default for f in dataclasses.fields(peft.BOFTConfig)}
    assert set(ours) == set(theirs)
    for name, default in theirs.items():
        if name != "peft_type":
            assert ours[name] == default, name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert peftkit.BOFTConfig().to_dict().keys() == peft.BOFTConfig().to_dict().keys()
