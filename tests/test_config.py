import pytest

from conftest import smoke_config
from smallvit import train
from smallvit.augment import resolution_at
from smallvit.config import Config, ConfigError, apply_overrides, diff, from_dict, parse_overrides, res_stages, to_dict
from smallvit.experiments import make_config


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


def test_res_schedule_parsing_and_refusals():
    assert res_stages("16:0.25, 24:0.5") == ((16, 0.25), (24, 0.5))
    assert res_stages("") == ()
    assert [resolution_at(s, 100, ((16, 0.25), (24, 0.5)), 32) for s in (0, 24, 25, 49, 50, 99)] == \
        [16, 16, 24, 24, 32, 32]
    for bad, match in (("16", "SIZE:FRACTION"), ("16:0.5,24:0.25", "must increase"), ("18:0.5", "multiple of"),
                       ("40:0.5", "at most"), ("16:0", "must increase")):
        with pytest.raises(ConfigError, match=match):
            make_config("smoke", {"train.res_schedule": bad})
    with pytest.raises(ConfigError, match="needs model.arch=vit"):
        make_config("smoke", {"model.arch": "swin", "model.patch_size": 2, "train.res_schedule": "16:0.5"})


def test_bad_split_sizes_are_refused(fake_cifar, tmp_path):
    with pytest.raises(ConfigError, match="data.val_images"):
        make_config("smoke", {"data.val_images": -1})
    with pytest.raises(ConfigError, match="data.val_images=600"):
        make_config("smoke", {"data.val_images": 600, "data.subset": 600})
    with pytest.raises(ConfigError, match="between 1 and 599"):
        train(smoke_config(fake_cifar, **{"data.val_images": 600}), tmp_path / "r")
