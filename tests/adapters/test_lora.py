"""LoRA through peft: init equivalence, trainable set, FFA, merge, wire format, peft format."""

import pytest
import torch
from opacus import GradSampleModule
from peft import PeftModel

from core.adapters.lora import (
    AdapterStateError,
    adapter_state,
    add_lora,
    load_adapter_state,
    load_adapters,
    save_adapters,
    trainable_parameter_names,
)
from core.adapters.settings import LoraSettings
from core.model.vit import count_parameters, create_vit

X2D, S2D = torch.randn(2, 1, 1, 32, 32), (1e4, 1.0, 1.0)
X3D, S3D = torch.randn(2, 1, 8, 32, 32), (5.0, 0.7, 0.7)


def lora_model(mode="ffa", seed=0, **kw):
    torch.manual_seed(seed)
    model = create_vit("micro", num_classes=2)
    return add_lora(model, LoraSettings(rank=4, mode=mode, **kw))


def test_output_unchanged_at_init():
    torch.manual_seed(1)
    base = create_vit("micro", num_classes=2).eval()
    reference = base(X3D, S3D).detach().clone()
    peft_model = add_lora(base, LoraSettings(rank=4)).eval()
    torch.testing.assert_close(peft_model(X3D, S3D), reference)


@pytest.mark.parametrize("mode", ["ffa", "vanilla"])
def test_only_adapters_and_head_are_trainable(mode):
    names = trainable_parameter_names(lora_model(mode))
    assert names
    for name in names:
        assert ".lora_B." in name or ".lora_A." in name or ".head.modules_to_save." in name
    assert any(".lora_A." in n for n in names) == (mode == "vanilla")


def test_ffa_a_is_seeded_identically_and_stays_put_after_a_step():
    one, two = lora_model("ffa", seed=1), lora_model("ffa", seed=2)  # different global RNG
    a_one = {k: v for k, v in one.state_dict().items() if "lora_A" in k}
    a_two = {k: v for k, v in two.state_dict().items() if "lora_A" in k}
    assert a_one.keys() == a_two.keys() and a_one
    assert all(torch.equal(a_one[k], a_two[k]) for k in a_one)
    optimizer = torch.optim.SGD([p for p in one.parameters() if p.requires_grad], lr=1.0)
    one(X2D, S2D).sum().backward()
    optimizer.step()
    after = {k: v for k, v in one.state_dict().items() if "lora_A" in k}
    assert all(torch.equal(after[k], a_one[k]) for k in a_one)
    b_after = [v for k, v in one.state_dict().items() if "lora_B" in k]
    assert any(v.abs().sum() > 0 for v in b_after)  # B moved


def test_merged_output_equals_unmerged():
    model = lora_model("vanilla").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    unmerged = model(X3D, S3D)
    merged = model.merge_and_unload()(X3D, S3D)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)


def test_wire_format_keys_and_shapes_are_pinned():
    ffa, vanilla = adapter_state(lora_model("ffa")), adapter_state(lora_model("vanilla"))
    expected_ffa = {f"blocks.{i}.attn.{p}.lora_B.weight": (96, 4) for i in range(4) for p in "qv"}
    expected_ffa = {
        k.replace(".q.", ".q_proj.").replace(".v.", ".v_proj."): v for k, v in expected_ffa.items()
    }
    expected_ffa |= {"head.fc.weight": (2, 96), "head.fc.bias": (2,)}
    assert {k: tuple(v.shape) for k, v in ffa.items()} == expected_ffa
    expected_a = {k.replace("lora_B", "lora_A"): (4, 96) for k in expected_ffa if "lora_B" in k}
    assert {k: tuple(v.shape) for k, v in vanilla.items()} == expected_ffa | expected_a
    assert all(v.dtype == torch.float32 for v in ffa.values())


def test_wire_format_has_no_opacus_prefix_and_round_trips():
    source = lora_model("vanilla")
    with torch.no_grad():
        for _name, p in source.named_parameters():
            if p.requires_grad:
                p.normal_()
    wrapped = GradSampleModule(source)
    state = adapter_state(wrapped)
    assert not any("_module" in k for k in state)
    target = lora_model("vanilla")  # same backbone, fresh adapters
    load_adapter_state(target, state)
    assert all(torch.equal(adapter_state(target)[k], v) for k, v in state.items())
    torch.testing.assert_close(target.eval()(X2D, S2D), source.eval()(X2D, S2D))


def test_loading_is_strict():
    model = lora_model("ffa")
    state = adapter_state(model)
    with pytest.raises(AdapterStateError, match="missing"):
        load_adapter_state(model, {k: v for k, v in state.items() if k != "head.fc.bias"})
    with pytest.raises(AdapterStateError, match="unexpected"):
        load_adapter_state(model, state | {"blocks.0.attn.k_proj.lora_B.weight": torch.zeros(1)})
    key = "head.fc.weight"
    with pytest.raises(AdapterStateError, match="shape"):
        load_adapter_state(model, state | {key: torch.zeros(3, 96)})
    with pytest.raises(AdapterStateError, match="NaN"):
        load_adapter_state(model, state | {key: torch.full((2, 96), float("nan"))})
    with pytest.raises(AdapterStateError, match="dtype"):
        load_adapter_state(model, state | {key: torch.zeros(2, 96, dtype=torch.int64)})


def test_saved_in_peft_format_and_peft_loads_it(tmp_path):
    model = lora_model("ffa")
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_()
    save_adapters(model, tmp_path)
    assert (tmp_path / "adapter_config.json").is_file()
    assert (tmp_path / "adapter_model.safetensors").is_file()
    torch.manual_seed(0)  # the same backbone as lora_model built
    loaded = load_adapters(create_vit("micro", num_classes=2), tmp_path)
    assert isinstance(loaded, PeftModel)
    torch.testing.assert_close(loaded.eval()(X3D, S3D), model.eval()(X3D, S3D))


def test_base_lora_qv_r8_is_under_half_a_percent():
    backbone = create_vit("base", num_classes=2)
    total = count_parameters(backbone)
    model = add_lora(backbone, LoraSettings(rank=8, targets="qv", mode="vanilla"))
    lora = count_parameters(model, lambda n: "lora_" in n)
    assert lora == 12 * 2 * 2 * 768 * 8  # 294,912: A and B for q and v in 12 blocks
    assert lora / total < 0.005


def test_a_model_without_its_lora_mode_is_refused_not_guessed():
    """A PeftModel not built by add_lora has no recorded mode: shipping A (vanilla) by default
    would leak the frozen FFA factor and break the pinned wire format."""
    from peft import LoraConfig, get_peft_model

    backbone = create_vit("micro", num_classes=2)
    bare = get_peft_model(backbone, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(AdapterStateError, match="no LoRA mode"):
        adapter_state(bare)
