"""The experiments (experiments.py): every ablation is a small valid diff, and each speed-run ablation takes back
exactly its ingredient."""

from smallvit.config import diff
from smallvit.experiments import ABLATIONS, make_config


def test_every_ablation_is_a_small_valid_diff():
    for name, d in ABLATIONS.items():
        cfg = make_config("baseline", ablation=name)
        # a backbone swap (swin, cait) also sets its shape: the arch plus up to three keys
        assert set(diff(cfg)) <= set(d) and len(d) <= (4 if "model.arch" in d else 3), name
        assert all(diff(cfg)[k] == v for k, v in d.items() if k in diff(cfg))


def test_each_speedrun_ablation_takes_back_exactly_its_ingredient():
    from smallvit.config import Config, diff
    from smallvit.experiments import ABLATIONS, SPEEDRUN_ABLATIONS, SPEEDRUN_INGREDIENTS, STUDIES

    recipe = make_config("speedrun")
    assert recipe.model.arch == "vit" and recipe.model.patch_size == 4  # a plain patch embedding, no conv stem
    assert (STUDIES["speedrun"] == ["baseline", *SPEEDRUN_ABLATIONS]
            and not set(SPEEDRUN_ABLATIONS) & set(STUDIES["all"]))
    for name, keys in SPEEDRUN_INGREDIENTS.items():
        assert all(diff(recipe)[k] == v for k, v in keys.items())  # the recipe holds the ingredient
        without = make_config("speedrun", ablation=f"-{name}")
        assert set(diff(without, recipe)) == set(keys)  # and the ablation undoes only that
        assert all(diff(without, Config()).get(k) is None for k in keys)
        assert f"-{name}" in ABLATIONS
        assert all(diff(make_config("speedrun-gpu"))[k] == v for k, v in keys.items())  # the GPU starting point too
