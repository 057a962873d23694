import pytest

from dynllava.config import SparseConfig, keep_count
from dynllava.errors import ConfigError

# The released sparse_config of Dynamic-LLaVA (spec: ../shared/dynamic-llava-spec.md, "Official checkpoint layout").
OFFICIAL_DEFAULTS = {
    "use_vision_predictor": True, "vision_keep_rate": 0.2, "use_text_predictor": True,
    "use_output_text_predictor": True, "output_text_keep_rate": 0.5, "output_text_len_for_training": 50,
    "use_instruct_predictor": False, "sparse_layer": 2, "d_model": 512, "nhead": 8, "dim_feedforward": 2048,
    "num_layers": 2, "mask_loss_weight": 100.0,
}


def test_defaults_are_the_official_ones():
    cfg = SparseConfig().to_dict()
    for key, value in OFFICIAL_DEFAULTS.items():
        assert cfg[key] == value, key


def test_unknown_keys_are_kept_and_ignored():
    cfg = SparseConfig.from_dict({**OFFICIAL_DEFAULTS, "maskclip": "ViT-B/16", "maskclip_alpha": 0.3})
    assert cfg.extra == {"maskclip": "ViT-B/16", "maskclip_alpha": 0.3}
    assert cfg == SparseConfig()  # extras do not change the semantics
    assert cfg.to_dict()["maskclip"] == "ViT-B/16"  # and round-trip


@pytest.mark.parametrize("changes, field", [
    ({"vision_keep_rate": 0.0}, "vision_keep_rate"), ({"vision_keep_rate": 1.5}, "vision_keep_rate"),
    ({"sparse_layer": -1}, "sparse_layer"), ({"d_model": 510}, "d_model"), ({"nhead": 0}, "nhead"),
    ({"use_vision_predictor": "yes"}, "use_vision_predictor"), ({"num_layers": 2.5}, "num_layers"),
])
def test_invalid_values_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        SparseConfig.from_dict({**OFFICIAL_DEFAULTS, **changes})


def test_keep_count_is_exact_floor():
    assert keep_count(0.2, 576) == 115  # the paper's 115 of 576
    assert keep_count(0.29, 100) == 29  # float(0.29) * 100 = 28.999... would give 28
    assert keep_count(1.0, 64) == 64
    assert SparseConfig(use_vision_predictor=False).vision_keep_count(576) == 576
