"""Properties of the stage presets (reimagen/config.py, Sec. 4): paper sizes, tiny presets, config validation."""

import pytest
import torch

from reimagen.models.config import PRESETS, UNetConfig, get_preset
from reimagen.models.unet import ReImagenUNet, count_parameters

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


# ----------------------------------------------------------------------------------------------
# up_res_blocks (Efficient-U-Net-style UStack) and the small-32-eff preset
# ----------------------------------------------------------------------------------------------
def test_up_res_blocks_validation_normalisation_and_json_round_trip():
    import json

    cfg = UNetConfig(channel_mults=[1, 2], num_res_blocks=(2, 3), up_res_blocks=[1, 2])
    assert cfg.up_res_blocks == (1, 2) and cfg.ustack_res_blocks == (1, 2)
    assert UNetConfig(channel_mults=(1, 2), num_res_blocks=2, up_res_blocks=1).up_res_blocks == (1, 1)  # int form
    assert UNetConfig(channel_mults=(1, 2), num_res_blocks=(2, 3)).ustack_res_blocks == (3, 4)  # default: nrb + 1
    back = UNetConfig.from_dict(json.loads(cfg.to_json()))
    assert back == cfg and back.up_res_blocks == (1, 2)
    eff = get_preset("small-32-eff")
    assert UNetConfig.from_dict(json.loads(eff.to_json())) == eff
    for bad in [(1,), (0, 1), (1, 5)]:  # wrong length, no block, more blocks than the level has skips
        with pytest.raises(ValueError, match="up_res_blocks"):
            UNetConfig(channel_mults=(1, 2), num_res_blocks=(2, 3), up_res_blocks=bad)


def test_configs_without_up_res_blocks_serialise_and_load_as_before():
    """Checkpoints and run manifests written before the field existed have no "up_res_blocks" key: they load
    (as None = the old UStack), and configs without the option still serialise without the key."""
    import json

    for name in ("small-32", "toy-32", "tiny-16", "paper-64"):
        cfg = get_preset(name)
        d = json.loads(cfg.to_json())
        assert "up_res_blocks" not in d
        assert UNetConfig.from_dict(d) == cfg and UNetConfig.from_dict(d).up_res_blocks is None
        assert UNetConfig.from_dict({**d, "up_res_blocks": None}) == cfg
    assert "up_res_blocks" in get_preset("small-32-eff").to_dict()


def test_small_32_eff_matches_small_32_in_size_with_the_blocks_moved_to_the_dstack():
    small, eff = get_preset("small-32"), get_preset("small-32-eff")
    same = ("image_size", "base_channels", "channel_mults", "attn_resolutions", "head_dim", "text_dim", "cond_dim",
            "text_width", "neighbour_heads", "prediction", "schedule")
    assert all(getattr(small, f) == getattr(eff, f) for f in same)
    with torch.device("meta"):
        ms, me = ReImagenUNet(small), ReImagenUNet(eff)
    assert abs(count_parameters(me) / count_parameters(ms) - 1) <= 0.05
    assert count_parameters(me.dstack) > count_parameters(me.ustack)  # the DStack carries most parameters
    assert count_parameters(ms.dstack) < count_parameters(ms.ustack)


def test_presets_command_lists_small_32_eff_with_its_parameter_count():
    import re

    from typer.testing import CliRunner

    from reimagen_eval.cli import app

    res = CliRunner().invoke(app, ["presets"])
    assert res.exit_code == 0, res.output
    with torch.device("meta"):
        n = count_parameters(ReImagenUNet(get_preset("small-32-eff")))
    assert re.search(rf"small-32-eff\W+32\W+{re.escape(f'{n / 1e6:,.1f}M')}", res.output), res.output


def test_toy_32_n16_is_toy_32_with_its_neighbour_attention_at_16x16():
    """The attention-placement experiment of the toy world (README): one level fewer, so the DStack output where
    the neighbours are attended to (Sec. 3.2) is 16x16; everything else as toy-32."""
    toy, n16 = get_preset("toy-32"), get_preset("toy-32-n16")
    assert (toy.feature_size, n16.feature_size) == (8, 16)
    assert n16.attn_resolutions == (16,) and n16.neighbour_attention
    differ = {f for f in toy.to_dict() if getattr(toy, f) != getattr(n16, f)}
    assert differ == {"channel_mults", "num_res_blocks", "attn_resolutions"}
    m = ReImagenUNet(n16).eval()
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    text = m.project_text(torch.randn(2, 5, 384), torch.ones(2, 5, dtype=torch.bool))
    mem = m.encode_neighbours(torch.randn(2, 2, 3, 32, 32), m.project_text(torch.randn(4, 5, 384),
                                                                           torch.ones(4, 5, dtype=torch.bool)))
    assert mem.num_tokens == 2 * 16 * 16  # K neighbours x 16 x 16 tokens
    assert m(x, t, text, mem).shape == x.shape
