"""The experiments: named presets (the scale of a run), ablations (what is studied), studies (lists of ablations), the
speed run's ingredients and the paper's numbers, each a small dict of dotted keys applied on top of `Config()`.

Presets are composed from the named pieces below, so a shared shape or recipe is said once. make_config is where an
experiment becomes a validated Config.
"""

from __future__ import annotations

from .config import Config, ConfigError, apply_overrides
from .datasets import DATASETS

# The reference's other backbones at its shapes for 32-px input (reference §11); the rest is the baseline's recipe.
# Above 32 px the reference uses patch 4 (swin) and 8 (cait): add model.patch_size.
SWIN = {"model.arch": "swin", "model.embed_dim": 96, "model.patch_size": 2}
CAIT = {"model.arch": "cait", "model.depth": 24, "model.num_heads": 4, "model.class_attn_depth": 2}

# The speed run (README "Speed run", benchmarks/cpu_speedrun.py): a plain ViT (patch embedding, no conv stem) to the
# best test accuracy in 10 minutes of wall time on 2 CPU cores. Each ingredient is a set of general config keys,
# named so that a GPU attempt can reuse them; "-<name>" in ABLATIONS takes one back out of the speedrun preset.
SPEEDRUN_INGREDIENTS: dict[str, dict[str, object]] = {
    # the patch embedding's first filters set to whitening filters of the data's 4x4 patches (reference §6.9)
    "whiten": {"model.patch_init": "whiten"},
    "gap": {"model.num_cls_tokens": 0},  # global average pooling instead of a CLS token (big_vision)
    "muon": {"optim.name": "muon"},  # Muon on the hidden matrices, AdamW on the rest
    "linear-decay": {"optim.schedule": "linear"},  # a straight line to zero instead of the cosine
    "flip-tta": {"train.eval_flip": True},  # the mean of each image's and its mirror's logits
}
# What undoes each ingredient (the baseline's value of its keys).
SPEEDRUN_ABLATIONS = {f"-{name}": {k: getattr(getattr(Config(), k.split(".")[0]), k.split(".")[1]) for k in keys}
                      for name, keys in SPEEDRUN_INGREDIENTS.items()}

# The pieces presets are made of.
# A run of a few epochs: an epoch is one pass over the images (no repeated augmentation), the warm-up one epoch.
FEW_EPOCHS = {"aug.repeats": 1, "optim.warmup_epochs": 1}
# ... at twice the baseline's peak learning rate: the small models of the CPU runs and the GPU speed run.
FEW_EPOCHS_FAST = {**FEW_EPOCHS, "optim.lr": 2e-3}
# A narrow, shallow ViT that trains a useful model on 2 CPU cores in minutes.
CPU_RUN = {"model.embed_dim": 96, "model.depth": 4, "model.num_heads": 4, "train.batch_size": 128,
           **FEW_EPOCHS_FAST}
# Crops and flips only, no stochastic depth: a run of a few epochs does not overfit.
LIGHT = {"aug.autoaugment": "none", "aug.erase_p": 0.0, "aug.mixup": False, "aug.cutmix": False,
         "model.drop_path": 0.0}
# About 10 minutes on 2 cores (the speed run: ~7.5 min here, so that a machine 25% slower still finishes within 10).
CPU_TEN_MINUTES = {**CPU_RUN, **LIGHT, "train.epochs": 8}
# Every speed-run ingredient, and the test set scored once, at the end.
SPEEDRUN = {**{k: v for i in SPEEDRUN_INGREDIENTS.values() for k, v in i.items()}, "train.eval_every_epochs": 0}
QUIET = {"train.progress": False}  # no progress bar: runs of a study or of the tests, read from their logs


def dataset_preset(name: str) -> dict[str, object]:
    """Train on a registered dataset: its name, its classes and its images' size, from its record (datasets.py)."""
    info = DATASETS[name]
    return {"data.dataset": name, "model.num_classes": info.num_classes, "model.img_size": info.image_size}


# Named presets: each is a diff against the baseline.
PRESETS: dict[str, dict[str, object]] = {
    "baseline": {},
    # A CPU demo that trains for about 10 minutes on 2 cores: a narrow, shallow ViT on a short schedule.
    "quick": {**CPU_TEN_MINUTES, "train.eval_every_epochs": 2},
    # The main job (./run.sh): the speed run on 2 CPU cores, the test set scored once at the end.
    # The whole command ends within 10 minutes on any 2-core machine: the time budget (590 s: the shell and the
    # set-up check take the rest) decides the passes from the measured step rate, at most 20 (budget.py).
    "speedrun": {**CPU_TEN_MINUTES, **SPEEDRUN, "train.time_budget_s": 590.0, "train.epochs": 20},
    # A starting point for a GPU speed run (docs/speedrun.md), NOT yet run on a GPU: the paper's 3.6M-parameter ViT
    # with the same ingredients, a batch that fills a GPU, bf16 (train.precision=auto) and compiled.
    "speedrun-gpu": {**LIGHT, **FEW_EPOCHS_FAST, **SPEEDRUN, "train.epochs": 20, "train.batch_size": 512,
                     "train.compile": True},
    # The CPU mini-study: the quick model with the paper's full augmentation recipe (about 5 minutes a run).
    "mini": {**CPU_RUN, **QUIET, "model.drop_path": 0.05, "train.epochs": 3, "train.eval_every_epochs": 1},
    # Tiny and fast: used by the tests.
    "smoke": {
        **FEW_EPOCHS, **QUIET,
        "model.embed_dim": 32,
        "model.depth": 2,
        "model.num_heads": 2,
        "data.subset": 512,
        "data.test_subset": 256,
        "train.epochs": 2,
        "train.batch_size": 64,
        "train.eval_every_epochs": 1,
        "train.log_every_steps": 4,
    },
    # Other datasets at the baseline's scale (reference §5.1-5.3): SVHN digits are not mirror-symmetric, so no flip.
    "cifar100": dataset_preset("cifar100"),
    "svhn": {**dataset_preset("svhn"), "aug.autoaugment": "svhn", "aug.flip": False},
    # The backbones of reference §11 at the paper's recipe.
    "swin": SWIN,
    "cait": CAIT,
    # reference §5.1 and the AutoAugment decision of §12.19 (docs/backbones-and-datasets.md): Tiny-ImageNet is a
    # subset of ImageNet, so it keeps the reference's ImageNet policy; CINIC-10 is CIFAR-10's classes at 32 px
    # (CIFAR-10's images plus ImageNet ones downsampled), so it takes the CIFAR-10 policy, not the reference's ImageNet.
    "tinyimagenet": {**dataset_preset("tinyimagenet"), "aug.autoaugment": "imagenet"},
    "cinic10": {**dataset_preset("cinic10"), "aug.autoaugment": "cifar10"},
    # DINO pre-training on the training images (smallvit pretrain): the parent project's CIFAR recipe
    # (vits-for-small-scale-datasets at 43a7493; README: ViT 192/9/12, patch 4, batch 256 per GPU on 2 GPUs;
    # train_ssl.py: 200 epochs, 30 warm-up epochs, weight decay 0.04 -> 0.4). The ssl.* defaults carry the rest.
    # docs/pretrain.md tables each key against the parent and the original DINO. Fine-tune with the finetune
    # preset and train.init_from=RUN.
    "pretrain": {
        "model.depth": 9,
        "model.pos_interp": "dino",  # local views: DINO's interpolate_pos_encoding (models/vit.py 178-198)
        "aug.repeats": 1,
        # train_ssl.py line 320: lr x batch / 256 (help text lines 116-118), 1e-4 x 512 / 256 = 2e-4 at the peak
        "optim.lr": 1e-4,
        "optim.lr_scale": "per256",
        "optim.min_lr": 1e-6,
        "optim.weight_decay": 0.04,
        "optim.decay_all": False,
        "optim.no_decay": "1d",  # utils/utils_ssl.py line 623: only biases and 1-D tensors are not regularised
        "optim.warmup_epochs": 30,
        "optim.warmup_from": "zero",  # utils/utils_ssl.py 223-227: np.linspace(start_warmup_value=0, lr, ...)
        "ssl.clip_qkv": "fused",  # models/vit.py line 76 (one qkv Linear), clipped per tensor (utils_ssl.py 63-71)
        "ssl.teacher_mode": "train",  # train_ssl.py 211-222: drop_path_rate 0.1 (line 125), never put in eval mode
        "train.epochs": 200,
        "train.batch_size": 512,
        "train.eval_every_epochs": 10,
    },
    # The parent project's fine-tuning (finetune.py defaults: 100 epochs, 10 warm-up, batch 256, lr 1e-3, the same
    # augmentation as the baseline) on the pre-trained 9-block backbone.
    "finetune": {"model.depth": 9},
}


# Named ablations: each differs from the baseline in a few keys. The paper's README columns (reference §4)
# carry `paper_acc` in PAPER_RESULTS below; the rest are the design space the paper describes without a column.
ABLATIONS: dict[str, dict[str, object]] = {
    "baseline": {},
    # Augmentation (README group "Augmentation")
    "-aa": {"aug.autoaugment": "none"},
    "-mixup": {"aug.mixup": False},
    "-cutmix": {"aug.cutmix": False},
    "-erasing": {"aug.erase_p": 0.0},
    "-smoothing": {"train.label_smoothing": 0.0},
    "randaugment": {"aug.autoaugment": "rand"},
    "ra-in-batch": {"aug.repeat_mode": "in_batch"},
    # Patch-token initialisation (README group "Patch")
    "sin": {"model.pos_embed": "sincos"},
    "whiten": {"model.patch_init": "whiten"},
    "whiten-all": {"model.patch_init": "whiten", "model.whiten_filters": "all"},
    # Low-rank q/k/v (README group "MLA")
    "mla-q": {"model.latent": "q"},
    "mla-k": {"model.latent": "k"},
    "mla-qk": {"model.latent": "qk"},
    "mla-kv": {"model.latent": "kv"},
    "mla-qkv": {"model.latent": "qkv"},
    "mla-kv-shared": {"model.latent": "kv", "model.latent_kv_shared": True},
    # Several CLS tokens, with and without class-attention blocks (reference §6.7)
    **{f"cls{k}": {"model.num_cls_tokens": k} for k in (2, 4, 8)},
    **{f"cls{k}-ca2": {"model.num_cls_tokens": k, "model.class_attn_depth": 2} for k in (1, 2, 4, 8)},
    "cls4-ca2-cait": {"model.num_cls_tokens": 4, "model.class_attn_depth": 2, "model.class_attn": "cait"},
    "cls4-mean": {"model.num_cls_tokens": 4, "model.cls_pool": "mean"},
    # Batch size and optimisers (README group "DDP"). The reference ran these under torchrun, which also switched
    # "repeated augmentation" to in-batch repeats (reference §5.5, bug 10), so these columns carry that key too;
    # "ra-in-batch" above is its "bs256" column.
    "bs1024": {"train.batch_size": 1024, "aug.repeat_mode": "in_batch"},
    "lion-bs1024": {"train.batch_size": 1024, "aug.repeat_mode": "in_batch", "optim.name": "lion"},
    "lion": {"optim.name": "lion", "optim.lr": 3e-4, "optim.weight_decay": 0.5},
    "muon": {"optim.name": "muon"},
    "adamw-nowd-1d": {"optim.decay_all": False},
    "depth9": {"model.depth": 9},
    # Other backbones (reference §11), built from timm's classes
    "swin": SWIN,
    "cait": CAIT,
    # The speed run's ingredients, each taken back out of the speedrun preset (study "speedrun")
    **SPEEDRUN_ABLATIONS,
}

# The reference README's Val/Acc (%) for the columns that have one (reference §4).
PAPER_RESULTS: dict[str, float] = {
    "baseline": 93.65, "-aa": 92.14, "-mixup": 93.68, "-cutmix": 92.77, "sin": 93.43, "whiten": 93.28,
    "mla-qkv": 91.8, "mla-kv": 92.43, "mla-qk": 92.42, "mla-q": 93.32, "mla-k": 92.5,
    "ra-in-batch": 93.44, "bs1024": 92.09, "lion-bs1024": 92.38,
}

# Studies: a named list of ablations, run x seeds by ablate.py.
STUDIES: dict[str, list[str]] = {
    "augmentation": ["baseline", "-aa", "-mixup", "-cutmix"],
    "patch": ["baseline", "sin", "whiten"],
    "mla": ["baseline", "mla-q", "mla-k", "mla-qk", "mla-kv", "mla-qkv"],
    "cls": ["baseline", "cls2", "cls4", "cls8", "cls1-ca2", "cls2-ca2", "cls4-ca2", "cls8-ca2"],
    "optim": ["baseline", "ra-in-batch", "bs1024", "lion-bs1024", "lion", "muon"],
    # Every column of the reference README table (reference §4).
    "paper": list(PAPER_RESULTS),
    "all": [a for a in ABLATIONS if a not in SPEEDRUN_ABLATIONS],  # the paper's design space
    # The CPU mini-study of the README: one or two ablations from each group of the paper's table.
    "mini": ["baseline", "-aa", "-mixup", "-cutmix", "sin", "mla-qkv"],
    # The reference's three backbones side by side (reference §11): the ViT, timm's Swin and timm's CaiT.
    "archs": ["baseline", "swin", "cait"],
    # The speed run's ingredients, one at a time taken out of --preset speedrun (benchmarks/cpu_speedrun.py).
    "speedrun": ["baseline", *SPEEDRUN_ABLATIONS],
}


# Design spaces for `smallvit search` (search.py, docs/search.md): each entry a config key with a list of choices or
# a range {"low", "high", "log" (sample on a log scale), "step"}, int or float as the key is. A combination the
# config refuses (heads not dividing the width) is recorded as a pruned trial, never trained.
SPACES: dict[str, dict[str, object]] = {
    # For the tests: a smoke-sized model, cheap to train.
    "tiny": {"model.embed_dim": [16, 32], "model.depth": {"low": 1, "high": 2}, "model.num_heads": [2, 4],
             "optim.lr": {"low": 1e-3, "high": 1e-2, "log": True}},
    # The CPU speed run's knobs (--preset speedrun): shape, optimiser, schedule, regularisation, augmentation.
    "speedrun": {
        "model.embed_dim": [64, 96, 128, 192], "model.depth": {"low": 2, "high": 8}, "model.num_heads": [2, 3, 4, 6],
        "model.mlp_ratio": [1.5, 2.0, 3.0, 4.0], "model.patch_size": [2, 4, 8],
        "optim.lr": {"low": 5e-4, "high": 8e-3, "log": True}, "optim.muon_lr": {"low": 5e-3, "high": 5e-2, "log": True},
        "optim.weight_decay": {"low": 5e-3, "high": 0.2, "log": True}, "optim.warmup_epochs": {"low": 1, "high": 3},
        "train.label_smoothing": {"low": 0.0, "high": 0.2}, "aug.crop_pad": [0, 2, 4],
        "aug.autoaugment": ["none", "rand"], "aug.randaugment_magnitude": {"low": 1, "high": 15},
        "aug.erase_p": {"low": 0.0, "high": 0.3}, "aug.mixup": [False, True], "aug.cutmix": [False, True],
    },
    # The paper's knobs at the baseline's scale (--preset baseline; ABLATIONS' groups): augmentation, patch-token
    # initialisation, low-rank q/k/v, CLS tokens and class attention, repeated augmentation, optimiser.
    "paper": {
        "aug.autoaugment": ["cifar10", "rand", "none"], "aug.mixup": [True, False], "aug.cutmix": [True, False],
        "aug.erase_p": [0.0, 0.25], "train.label_smoothing": [0.0, 0.1],
        "model.pos_embed": ["learned", "sincos"], "model.patch_init": ["default", "whiten"],
        "model.latent": ["", "q", "k", "qk", "kv", "qkv"], "model.latent_dim": [32, 64, 96],
        "model.num_cls_tokens": [1, 2, 4, 8], "model.class_attn_depth": [0, 2], "model.cls_pool": ["concat", "mean"],
        "aug.repeat_mode": ["passes", "in_batch"], "optim.name": ["adamw", "lion", "muon"],
        "optim.lr": {"low": 2e-4, "high": 3e-3, "log": True},
        "optim.weight_decay": {"low": 0.01, "high": 0.5, "log": True},
    },
}


def make_config(preset: str = "baseline", overrides: dict[str, object] | None = None,
                ablation: str = "baseline") -> Config:
    """Build a config: the preset (scale), then the named ablation (what is studied), then dotted overrides."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from: {', '.join(PRESETS)}")
    if ablation not in ABLATIONS:
        raise ConfigError(f"unknown ablation {ablation!r}; choose from: {', '.join(ABLATIONS)}")
    # validated once, as a whole: a rule between keys may need an override to settle what the preset and the
    # ablation leave (smoke's 32 channels and mla-q's latent_dim 64 need model.latent_dim=16)
    return apply_overrides(Config(), {**PRESETS[preset], **ABLATIONS[ablation], **(overrides or {})})
