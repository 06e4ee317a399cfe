"""merged_weights: a LoRA model's weights with the adapters merged, W = W0 + (alpha/r) B A, under the base
model's names, for engines that hold whole weights (servers, vLLM); the trained model itself unchanged."""

import copy

import torch
from safetensors.torch import load_model, save_file

from posttrain.config import LoraConfig, ModelConfig
from posttrain.models.loading import apply_lora, load_causal_lm, merged_weights


def _trained_lora(tiny_path, **kw):
    torch.manual_seed(0)
    model = apply_lora(load_causal_lm(ModelConfig(name_or_path=tiny_path)), LoraConfig(enabled=True, r=4, alpha=8, **kw))
    with torch.no_grad():  # B starts at zero (no change): give the adapters a value, as training would
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def test_merged_weights_equal_the_hand_computed_merge_and_peft_s_own(tiny_path):
    model = _trained_lora(tiny_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    merged = merged_weights(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the model is unchanged
    q = model.get_base_model().model.layers[0].self_attn.q_proj  # by hand: W0 + (alpha / r) B A
    by_hand = q.base_layer.weight + (8 / 4) * q.lora_B["default"].weight @ q.lora_A["default"].weight
    assert torch.allclose(merged["model.layers.0.self_attn.q_proj.weight"], by_hand, atol=1e-6)
    assert not torch.equal(by_hand, q.base_layer.weight)
    peft_merged = copy.deepcopy(model).merge_and_unload().state_dict()
    assert set(merged) <= set(peft_merged)
    assert max(float((merged[k] - peft_merged[k]).abs().max()) for k in merged) < 1e-6


def test_merged_weights_load_strictly_into_the_base_model(tiny_path, tmp_path):
    """The file a server loads (strict, as `posttrain serve` does) holds exactly the base model's names, tied
    weights once; the loaded model computes what the LoRA model computes."""
    model = _trained_lora(tiny_path, target_modules=["all-linear"])
    save_file({k: v.contiguous() for k, v in merged_weights(model).items()}, str(tmp_path / "w.safetensors"))
    plain = load_causal_lm(ModelConfig(name_or_path=tiny_path))
    missing, unexpected = load_model(plain, str(tmp_path / "w.safetensors"), strict=True)
    assert not missing and not unexpected
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(plain.eval()(ids).logits, model.eval()(ids).logits, atol=1e-5)
