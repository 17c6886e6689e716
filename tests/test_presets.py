"""Properties of the stage presets (reimagen/config.py, Sec. 4): paper sizes, tiny presets, config validation."""

import pytest
import torch

from reimagen.config import PRESETS, UNetConfig, get_preset
from reimagen.unet import ReImagenUNet, count_parameters

PAPER = ["paper-64", "paper-64-small", "paper-sr256", "paper-sr1024"]


@pytest.mark.parametrize("name", PAPER)
def test_paper_preset_parameter_count_within_15_percent_of_the_paper(name):
    preset = PRESETS[name]
    assert preset.paper_params is not None
    with torch.device("meta"):
        model = ReImagenUNet(preset.config)
    n = count_parameters(model)
    assert abs(n / preset.paper_params - 1) <= 0.15, f"{name}: {n:,} parameters vs {preset.paper_params:,} in the paper"
    assert next(model.parameters()).device.type == "meta"


def test_paper_presets_are_the_papers_resolutions_and_t5_xxl_width():
    sizes = {name: (PRESETS[name].config.lowres_size, PRESETS[name].config.image_size) for name in PAPER}
    assert sizes == {"paper-64": (None, 64), "paper-64-small": (None, 64), "paper-sr256": (64, 256),
                     "paper-sr1024": (256, 1024)}
    assert all(PRESETS[n].config.text_dim == 4096 for n in PAPER)
    assert all(PRESETS[n].config.neighbour_attention for n in PAPER)
    # the small 64x64 model is smaller than the full one, and both are larger than the SR stages
    params = {}
    for n in PAPER:
        with torch.device("meta"):
            params[n] = count_parameters(ReImagenUNet(PRESETS[n].config))
    assert params["paper-64"] > params["paper-64-small"] > params["paper-sr256"] > params["paper-sr1024"]


@pytest.mark.parametrize("name", ["tiny-16", "tiny-sr32"])
def test_tiny_presets_build_on_cpu_and_run(name):
    cfg = get_preset(name)
    model = ReImagenUNet(cfg)
    assert count_parameters(model) < 1_000_000
    assert cfg.text_dim == 32
    assert next(model.parameters()).device.type == "cpu"
    s = cfg.image_size
    text = model.project_text(torch.randn(2, 3, cfg.text_dim), torch.ones(2, 3, dtype=torch.bool))
    kw = {}
    if cfg.is_super_resolution:
        assert cfg.lowres_size == s // 2
        kw = {"lowres": torch.zeros(2, 3, s, s), "aug_t": torch.zeros(2)}
    with torch.no_grad():
        out = model(torch.randn(2, 3, s, s), torch.rand(2), text, None, drop_neighbours=torch.ones(2, dtype=torch.bool), **kw)
    assert out.shape == (2, 3, s, s)


def test_get_preset_unknown_name_raises_listing_known_presets():
    with pytest.raises(ValueError, match="unknown preset") as err:
        get_preset("paper-512")
    assert "tiny-16" in str(err.value)


def test_get_preset_overrides_return_a_new_config_and_leave_the_preset_alone():
    cfg = get_preset("tiny-16", text_dim=64)
    assert cfg.text_dim == 64 and get_preset("tiny-16").text_dim == 32
    assert get_preset("tiny-16") is PRESETS["tiny-16"].config
    with pytest.raises(ValueError, match="unknown UNetConfig fields"):
        get_preset("tiny-16", widht=3)


def test_unet_config_validation_and_json_round_trip(tiny_cfg):
    with pytest.raises(ValueError, match="num_res_blocks"):
        UNetConfig(channel_mults=(1, 2), num_res_blocks=(1, 1, 1))
    with pytest.raises(ValueError, match="divisible"):
        UNetConfig(image_size=30, channel_mults=(1, 2, 4))
    with pytest.raises(ValueError, match="lowres_size"):
        UNetConfig(image_size=32, lowres_size=32)
    with pytest.raises(ValueError, match="prediction"):
        UNetConfig(prediction="score")
    cfg = UNetConfig(num_res_blocks=2, channel_mults=[1, 2])  # int and list forms are normalised
    assert cfg.num_res_blocks == (2, 2) and cfg.channel_mults == (1, 2)
    import json

    assert UNetConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert tiny_cfg.feature_size == 8 and tiny_cfg.feature_dim == 32  # F = 16 / 2, d = 16 * 2
