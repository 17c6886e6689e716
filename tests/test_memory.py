"""reimagen.models.memory: training memory computed on fake tensors equals what a real forward pass saves."""

import pytest
import torch

from conftest import make_model
from reimagen.models.config import get_preset
from reimagen.models.memory import activation_bytes, estimate, parameter_count


def _real_saved_bytes(model, k=2, text_len=64):
    """Bytes autograd saves in a real fp32 forward of one sample, weights excluded, each storage once."""
    cfg = model.cfg
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    s = cfg.image_size
    emb, mask = torch.randn(k + 1, text_len, cfg.text_dim), torch.ones(k + 1, text_len, dtype=torch.bool)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        text = model.project_text(emb[:1], mask[:1])
        memory = model.encode_neighbours(torch.randn(1, k, 3, s, s), model.project_text(emb[1:], mask[1:]))
        model(torch.randn(1, 3, s, s), torch.rand(1), text, memory)
    return sum(saved.values())


@pytest.mark.parametrize("preset", ["tiny-16", "toy-32"])
def test_fake_tensor_activations_equal_a_real_forward(preset):
    model = make_model(preset).train()
    assert activation_bytes(model.cfg) == _real_saved_bytes(model)
    assert parameter_count(model.cfg) == sum(p.numel() for p in model.parameters())


def test_bf16_halves_activations_and_fsdp_divides_the_states():
    cfg = get_preset("toy-32")
    full, half = activation_bytes(cfg, "fp32"), activation_bytes(cfg, "bf16")
    assert 0.45 < half / full < 0.6  # (a few fp32 reductions stay)
    n = parameter_count(cfg)
    ddp = estimate(cfg, "bf16")
    assert ddp.states_bytes == 20 * n and ddp.weight_copy_bytes == 2 * n  # AdamW + EMA; autocast copies
    fsdp = estimate(cfg, "bf16", world_size=8, fsdp=True)
    assert fsdp.states_bytes == 20 * n / 8 and fsdp.weight_copy_bytes == 0
    assert fsdp.max_micro_batch(2 ** 30, reserve=0) > ddp.max_micro_batch(2 ** 30, reserve=0) > 0
    assert estimate(cfg, optimizer="adafactor").states_bytes == 12 * n
