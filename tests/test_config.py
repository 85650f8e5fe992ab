import pytest

from smallvit.config import Config, ConfigError, apply_overrides, diff, from_dict, parse_overrides, to_dict
from smallvit.experiments import ABLATIONS, make_config


def test_defaults_are_the_paper_baseline():
    c = Config()
    assert (c.model.embed_dim, c.model.depth, c.model.num_heads, c.model.patch_size) == (192, 12, 12, 4)
    assert (c.model.mlp_ratio, c.model.qkv_bias, c.model.norm_eps, c.model.drop_path) == (2.0, True, 1e-6, 0.1)
    assert (c.optim.name, c.optim.lr, c.optim.weight_decay, c.optim.min_lr) == ("adamw", 1e-3, 0.05, 1e-6)
    assert (c.train.batch_size, c.train.epochs, c.optim.warmup_epochs, c.aug.repeats) == (256, 100, 10, 3)
    assert c.train.label_smoothing == 0.1


def test_overrides_are_typed():
    cfg = apply_overrides(Config(), parse_overrides(
        ["model.depth=9", "optim.lr=3e-4", "aug.mixup=false", "optim.name=lion", "aug.erase_area=0.1,0.3"]))
    assert cfg.model.depth == 9 and isinstance(cfg.model.depth, int)
    assert cfg.optim.lr == 3e-4 and cfg.aug.mixup is False and cfg.optim.name == "lion"
    assert cfg.aug.erase_area == (0.1, 0.3)
    assert diff(cfg) == {"model.depth": 9, "optim.lr": 3e-4, "aug.mixup": False, "optim.name": "lion",
                         "aug.erase_area": (0.1, 0.3)}


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), {"model.dpeth": 3})
    assert "model.dpeth" in str(e.value) and "model.depth" in str(e.value) and "optim.lr" in str(e.value)


@pytest.mark.parametrize("key,value,words", [
    ("model.depth", "x", "integer"),
    ("model.depth", "2.5", "integer"),
    ("aug.mixup", "maybe", "true/false"),
    ("optim.lr", "-1", "positive"),
    ("model.depth", "0", ">= 1"),
    ("model.patch_size", "5", "divide"),
    ("model.num_heads", "5", "divide"),
    ("optim.name", "sgd", "one of adamw, lion, muon"),
    ("model.latent", "qx", "subset"),
])
def test_bad_values_fail_clearly(key, value, words):
    with pytest.raises(ConfigError, match=words):
        apply_overrides(Config(), parse_overrides([f"{key}={value}"]))


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["model.depth"])


def test_round_trip_and_presets():
    cfg = make_config("quick", {"model.depth": 3})
    assert from_dict(to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="unknown preset"):
        make_config("nope")


def test_every_ablation_is_a_small_valid_diff():
    for name, d in ABLATIONS.items():
        cfg = make_config("baseline", ablation=name)
        # a backbone swap (swin, cait) also sets its shape: the arch plus up to three keys
        assert set(diff(cfg)) <= set(d) and len(d) <= (4 if "model.arch" in d else 3), name
        assert all(diff(cfg)[k] == v for k, v in d.items() if k in diff(cfg))
