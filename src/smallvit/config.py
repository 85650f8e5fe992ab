"""Typed configuration machinery: the paper's baseline as defaults, dotted overrides, and the checks of every value.

Every default below is the reference system's baseline (reference §14) unless a comment says otherwise.
The experiments (presets, ablations, studies) are dicts of dotted keys applied on top of `Config()`: experiments.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Literal

from .datasets import DATASETS


@dataclass(frozen=True)
class ModelConfig:
    img_size: int = 32
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 10
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 2.0
    qkv_bias: bool = True
    norm_eps: float = 1e-6  # build_model passes 1e-6 (reference §6.5)
    drop_path: float = 0.1  # max stochastic depth, linear from 0 over the blocks
    # Low-rank ("MLA") q/k/v projections, reference §6.6: any subset of "qkv" is factorised D -> r -> D.
    latent: str = ""
    latent_dim: int = 64
    latent_kv_shared: bool = False  # beyond the paper: one down-projection feeds both k and v (DeepSeek MLA)
    # Several CLS tokens and class-attention blocks, reference §6.7.
    num_cls_tokens: int = 1  # 0: no CLS token, global average pooling of the patch tokens (big_vision's gap)
    cls_pool: Literal["concat", "mean"] = "concat"  # concat: head reads K*D; mean: head reads the mean of the K tokens
    class_attn_depth: int = 0
    # reference: patches projected (reference §6.7); cait: patches left unchanged
    class_attn: Literal["reference", "cait"] = "reference"
    # Patch-token initialisation, reference §6.4 and 6.9.
    pos_embed: Literal["learned", "sincos"] = "learned"
    patch_init: Literal["default", "whiten"] = "default"  # default: PyTorch conv init
    whiten_filters: Literal["first", "all"] = "first"  # first: the reference's c*k*k filters; all: every output channel
    whiten_images: int = 5000
    # Backbone (reference §11, `backbones.py`): vit (model.py) | swin | cait (timm's SwinTransformer and Cait classes).
    # swin reads embed_dim (stage 1; doubled per stage), patch_size, mlp_ratio, qkv_bias, norm_eps, drop_path (linear)
    # and the swin_* keys below instead of depth / num_heads; cait reads the ViT's shape keys, class_attn_depth (its
    # class-attention blocks) and layer_scale_init, with a constant drop_path. Defaults are the reference's shapes.
    arch: Literal["vit", "swin", "cait"] = "vit"
    swin_depths: tuple[int, ...] = (2, 6, 4)  # blocks per stage
    swin_heads: tuple[int, ...] = (3, 6, 12)  # heads per stage
    window_size: int = 4  # a stage whose grid is <= the window attends globally, unshifted (timm)
    layer_scale_init: float = 1e-5  # cait: LayerScale gamma of every residual branch (reference §11.2)
    # Beyond the paper: drop this fraction of the patch tokens (random per image) in training (timm's PatchDropout);
    # a step costs about (1 - patch_drop) of the full one. Evaluation always sees every token.
    patch_drop: float = 0.0
    # How the position table meets another grid (DINO's 16-px local views, train.res_schedule): resample (timm's
    # resample_abs_pos_embed to the target size, bicubic) | dino (DINO's interpolate_pos_encoding: bicubic with
    # scale_factor (grid + 0.1) / sqrt(N), which also shifts the sample points; the parent's models/vit.py 178-198).
    pos_interp: Literal["resample", "dino"] = "resample"


@dataclass(frozen=True)
class DataConfig:
    # A name in the dataset registry (datasets.DATASETS, so a choice key whose choices are the registry's names);
    # folder: an ImageFolder tree at data_dir
    dataset: str = "cifar10"
    data_dir: str = ""  # empty: $SMALLVIT_DATA, else ./data
    download: bool = True  # try the official source when files are missing
    subset: int = 0  # >0: use only the first N training images (tests, quick demos)
    test_subset: int = 0  # >0: evaluate on the first N test images only
    # >0: hold N training images out (stratified by class) as a validation set: evaluations during training and
    # best_* use it, the test set is evaluated once at the end. Chosen by val_seed, never by train.seed, so every
    # run of a study holds out the same images. 0: the paper's protocol (the test set at every evaluation).
    val_images: int = 0
    val_seed: int = 0


@dataclass(frozen=True)
class AugConfig:
    crop_pad: int = 4  # random crop after zero padding; 0 disables
    flip: bool = True
    autoaugment: Literal["cifar10", "svhn", "imagenet", "rand", "none"] = "cifar10"  # README column "-aa"
    # random: standard AutoAugment; ccw: the reference's quirk (reference §12.19)
    rotate_sign: Literal["random", "ccw"] = "random"
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    erase_p: float = 0.25
    erase_area: tuple[float, float] = (0.02, 0.4)
    erase_min_aspect: float = 0.3
    erase_log_aspect: bool = True  # the reference: uniform aspect (reference §5.3.3); standard is log-uniform
    # reference: raw dataset mean in normalised space
    erase_fill: Literal["reference", "zero", "noise"] = "reference"
    mixup: bool = True  # README column "-mixup"
    cutmix: bool = True  # README column "-cutmix"
    mix_p: float = 0.5  # probability that a batch is mixed at all (reference §5.4)
    mixup_alpha: float = 1.0
    cutmix_beta: float = 1.0
    # reference §5.5: "passes" = the single-process meaning (an epoch is `repeats` shuffled passes, no image twice in a
    # batch); "in_batch" = the torchrun meaning (each image `repeats` times in a row inside a batch).
    repeat_mode: Literal["passes", "in_batch"] = "passes"
    repeats: int = 3
    # Images augmented per call, as whole steps' batches (at least one): fewer, larger calls amortise per-op costs
    # (kernel launches on a GPU). 0 = auto: 4096 on CUDA, 512 on CPU. Counted over all processes (each augments its
    # part), so it is part of the random stream like the seed, but not the number of processes.
    chunk_images: int = 0


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["adamw", "lion", "muon"] = "adamw"
    lr: float = 1e-3  # peak learning rate (of the AdamW part for muon)
    # absolute: optim.lr is the peak as given | per256: optim.lr is per 256 images, the peak is lr x global batch / 256
    # (the linear scaling rule of DINO and the parent's train_ssl.py line 320). Only optim.lr: min_lr and muon_lr stay
    # absolute. optim.resolve_lr applies it; `smallvit info` prints the peak.
    lr_scale: Literal["absolute", "per256"] = "absolute"
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    decay_all: bool = True  # the reference decays every tensor (§12.13); False: no decay on what no_decay names
    # With decay_all=false, the tensors without weight decay: 1d-tokens (1-D tensors, cls_token, pos_embed and the
    # model's no_weight_decay()) | 1d (biases and 1-D tensors only: DINO's get_params_groups, the parent's
    # utils/utils_ssl.py 616-626, which decays cls_token and pos_embed)
    no_decay: Literal["1d-tokens", "1d"] = "1d-tokens"
    warmup_epochs: int = 10
    # Where the linear warm-up starts: min_lr | zero (DINO's cosine_scheduler, start_warmup_value=0: the parent's
    # utils/utils_ssl.py 223-227). The two differ by at most min_lr, 1% of the pretrain preset's peak: negligible.
    warmup_from: Literal["min_lr", "zero"] = "min_lr"
    # after the warm-up: cosine (reference §8) | linear | wsd (flat, then linear; optim.lr_at)
    schedule: Literal["cosine", "linear", "wsd"] = "cosine"
    decay_fraction: float = 0.2  # wsd: the last fraction of the post-warm-up steps that decays
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    grad_clip: float = 0.0  # 0: no clipping, as the reference
    # Muon's non-matrix part: adamw (the reference, reference §7.3) | nadamw (what timm's Muon picks with nesterov=True)
    muon_fallback: Literal["adamw", "nadamw"] = "adamw"
    muon_batched: bool = True  # step same-shape Muon matrices as one stack (far fewer kernel launches); False: timm's


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 100  # each epoch is aug.repeats passes over the data (reference §5.5)
    batch_size: int = 256
    label_smoothing: float = 0.1
    eval_every_epochs: int = 5  # and always after the last step (fixes reference §12.11)
    # >0: keep an exponential moving average of the weights (timm's ModelEmaV3, with its warm-up: the decay grows as
    # 1 - (1 + step)^(-2/3) up to this value); evaluations, the checkpoint's "model_ema" and every command that loads
    # the run (eval, export, predict, init_from) use it. 0: off.
    ema_decay: float = 0.0
    eval_flip: bool = False  # evaluations score the mean of each image's and its mirror's logits (flip TTA)
    # Progressive resizing (augment.resolution_at): "16:0.25,24:0.5" trains on 16-px images for the first 25% of the
    # steps, 24 px until 50%, then model.img_size; the position embedding is resampled (model.ViT.tokens). Empty: off.
    res_schedule: str = ""
    max_steps: int = 0  # >0: stop after this many steps (the schedule still spans the full run)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    compile: bool = False
    # torch.compile mode: default | reduce-overhead (CUDA graphs: one launch per graph instead of one per kernel,
    # for small models whose steps are launch-bound) | max-autotune | max-autotune-no-cudagraphs
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    threads: int = 0  # CPU threads for torch; 0 leaves torch's default
    log_every_steps: int = 50
    progress: bool = True
    on_nonfinite: Literal["stop", "skip"] = "stop"
    checkpoint_every_steps: int = 0  # >0: also checkpoint every N steps, so a SIGKILL loses at most N steps
    # >0: also checkpoint when this much wall time has passed since the last one (checked at each log step, where
    # the ranks agree on it), so a SIGKILL loses at most about this much work; 0: off.
    checkpoint_every_seconds: float = 60.0
    # >0: the whole command (imports, data, training, evaluations, the final test) ends within this many seconds:
    # after a few steps inside the warm-up the run measures its step rate and fixes its number of steps, at most
    # train.epochs' (budget.py); every schedule is then defined on that count, recorded in the run folder
    # (budget.json) and the checkpoint. 0: train.epochs passes.
    time_budget_s: float = 0.0
    # Start from pretrained weights (pretrained.py): a run folder or checkpoint, a timm ViT state dict, a DINO file.
    init_from: str = ""
    init_strict: bool = True  # false: load what fits, keep the initialisation of other mismatching tensors
    # Weights & Biases (wandb_log.py, `pip install smallvit[wandb]`): on when wandb_project is set.
    wandb_project: str = ""
    wandb_entity: str = ""
    wandb_name: str = ""  # empty: the run folder's path
    wandb_tags: str = ""  # comma-separated


@dataclass(frozen=True)
class SSLConfig:
    """DINO self-supervised pre-training (`smallvit pretrain`, pretrain.py). Defaults are the parent project's
    (hananshafi/vits-for-small-scale-datasets: train_ssl.py, projection_head.py, README's CIFAR command), which
    descend from facebookresearch/dino (main_dino.py, utils.py); a comment names the source of each."""

    out_dim: int = 1024  # README CIFAR command --out_dim 1024 (DINO: 65536 for ImageNet)
    head_hidden_dim: int = 512  # projection_head.MLPHead hidden_dim (DINO: 2048)
    head_bottleneck_dim: int = 256  # projection_head.MLPHead bottleneck_dim, as DINO
    head_layers: int = 3  # projection_head.MLPHead nlayers, as DINO
    # Weight-normalised last layer with its norm fixed at 1 (DINO's default). train_ssl.py passes False to the
    # teacher only; the student keeps MLPHead's default True, and the teacher's norm is the EMA of the student's
    # fixed 1, so the reference effectively runs with True.
    norm_last_layer: bool = True
    momentum_teacher: float = 0.996  # train_ssl.py --momentum_teacher, raised to 1 by a cosine over the run
    warmup_teacher_temp: float = 0.04  # train_ssl.py: teacher temperature 0.04 -> 0.07, linear per epoch
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 10  # train_ssl.py --warmup_teacher_temp_epochs
    student_temp: float = 0.1  # train_ssl.py ViewPredLoss student_temp
    center_momentum: float = 0.9  # train_ssl.py ViewPredLoss center_momentum
    weight_decay_end: float = 0.4  # cosine from optim.weight_decay (0.04 in the pretrain preset) to this
    clip_grad: float = 3.0  # train_ssl.py --clip_grad: each tensor's gradient norm clipped alone (DINO utils)
    # What ssl.clip_grad treats as one tensor: separate (q, k and v of a block each alone) | fused (a self-attention
    # block's q, k and v weights as one tensor, and their biases as another, as the parent's fused qkv Linear
    # (models/vit.py line 76) is clipped by utils/utils_ssl.py clip_gradients, lines 63-71)
    clip_qkv: Literal["separate", "fused"] = "separate"
    # eval: the teacher runs without drop path (DINO's original: its teacher is built with none) | train: the
    # teacher keeps the student's drop path (model.drop_path) and training mode, as the parent (train_ssl.py builds
    # it with drop_path_rate, 0.1 by line 125, at lines 211-222 and never calls eval()), so two teacher passes differ.
    teacher_mode: Literal["eval", "train"] = "eval"
    freeze_last_layer_epochs: int = 1  # train_ssl.py --freeze_last_layer
    global_crops: int = 2  # train_ssl.py: two global views, the only ones the teacher sees
    global_scale: tuple[float, float] = (0.7, 1.0)  # README CIFAR command (train_ssl.py default 0.5-1 for 64 px)
    local_crops: int = 8  # README CIFAR command --local_crops_number 8
    local_scale: tuple[float, float] = (0.2, 0.5)  # README CIFAR command (Tiny-ImageNet: 0.2-0.4)
    local_size: int = 0  # 0: model.img_size // 2, as train_ssl.py (16 px local crops for 32-px images)
    # train_ssl.py DataAugmentation (DINO's): ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8, grey p 0.2, Gaussian
    # blur sigma 0.1-2 with p 1.0 / 0.1 / 0.5 (global 1 / global 2 / local), solarize p 0.2 on global 2 only.
    jitter_p: float = 0.8
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    grey_p: float = 0.2
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.2
    knn_k: int = 20  # the k-NN monitor: DINO eval_knn.py's k = 20, cosine, temperature 0.07 weighted votes
    knn_temp: float = 0.07
    knn_train_images: int = 0  # >0: k-NN bank of the first N training images only (faster monitoring)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)  # used by `smallvit pretrain` only


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message says which and what is allowed."""


def _leaf_keys(cls, prefix="") -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in fields(cls):
        t = hints[f.name]
        if is_dataclass(t):
            out.update(_leaf_keys(t, prefix + f.name + "."))
        else:
            out[prefix + f.name] = t
    return out


VALID_KEYS = _leaf_keys(Config)


# Choice keys whose choices are a registry's names, read when a value is checked: a record registered at run time
# (a test's dataset) is a valid choice at once, and no list of names is written twice.
REGISTRIES: dict[str, dict] = {"data.dataset": DATASETS}


def choices(t) -> tuple[str, ...]:
    """The allowed values of a Literal-typed key (e.g. VALID_KEYS["optim.name"]); () for any other type."""
    return typing.get_args(t) if typing.get_origin(t) is Literal else ()


def key_choices(key: str) -> tuple[str, ...]:
    """The allowed values of a choice key (its Literal's, or its registry's names); () for any other key."""
    return tuple(REGISTRIES[key]) if key in REGISTRIES else choices(VALID_KEYS[key])


def coerce(key: str, value, t):
    """Convert `value` (a string from the CLI or a Python value) to type `t`, or raise ConfigError."""
    origin = typing.get_origin(t)
    if origin is Literal or key in REGISTRIES:  # one rule for every choice key: a new choice needs no check of its own
        allowed = key_choices(key)
        if isinstance(value, str) and value.strip() in allowed:
            return value.strip()
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
    if isinstance(value, str) and t is not str:
        text = value.strip()
        if t is bool:
            low = text.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        if origin is tuple:
            text = text.strip("()[] ")
            value = [p for p in text.split(",") if p.strip()]
        else:
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                kind = {int: "an integer", float: "a number"}.get(t, t.__name__)
                raise ConfigError(f"{key}: expected {kind}, got {value!r}") from None
    if origin is tuple:
        args = typing.get_args(t)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[int, ...]: any length, at least one value
            if not isinstance(value, (list, tuple)) or not value:
                raise ConfigError(f"{key}: expected comma-separated values, got {value!r}")
            args = (args[0],) * len(value)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} comma-separated values, got {value!r}")
        return tuple(coerce(key, v, a) for v, a in zip(value, args))
    if t is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        # JSON's NaN and Infinity parse as floats, but no key means anything by them, and NaN passes no range check
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if t is str:
        return str(value)
    raise ConfigError(f"{key}: unsupported type {t}")


def parse_overrides(items: list[str]) -> dict[str, str]:
    """Parse ["a.b=1", "c.d=x"] into a dict; each item must be KEY=VALUE."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. model.depth=9")
        k, v = item.split("=", 1)
        out[k.strip()] = v
    return out


def apply_overrides(cfg: Config, overrides: dict[str, object]) -> Config:
    """Return a copy of cfg with dotted keys replaced; unknown keys and bad values raise ConfigError."""
    for key, value in overrides.items():
        if key not in VALID_KEYS:
            close = [k for k in VALID_KEYS if k.split(".")[-1] == key.split(".")[-1]]
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            listed = (f"{k} ({' | '.join(key_choices(k))})" if key_choices(k) else k for k in sorted(VALID_KEYS))
            raise ConfigError(f"unknown config key {key!r}.{hint} Valid keys:\n  " + "\n  ".join(listed))
        section, name = key.split(".")
        sub = getattr(cfg, section)
        sub = replace(sub, **{name: coerce(key, value, VALID_KEYS[key])})
        cfg = replace(cfg, **{section: sub})
    validate(cfg)
    return cfg


def _check(ok: bool, msg: str):
    if not ok:
        raise ConfigError(msg)


def _at_least(key: str, value, lo, why: str = "") -> None:
    _check(value >= lo, f"{key} must be >= {lo}{why}, got {value}")


def _positive(key: str, value, why: str = "") -> None:
    _check(value > 0, f"{key} must be positive{why}, got {value}")


def _within(key: str, value, lo, hi, bounds: str = "[]", why: str = "") -> None:
    """value in the interval lo..hi, each end closed ("[", "]") or open ("(", ")") as `bounds` says."""
    ok = (value >= lo if bounds[0] == "[" else value > lo) and (value <= hi if bounds[1] == "]" else value < hi)
    hi_text = "2**32" if hi == SEED_LIMIT else f"{hi:g}"
    _check(ok, f"{key} must be in {bounds[0]}{lo:g}, {hi_text}{bounds[1]}{why}, got {value}")


COMPILE_MODES = choices(VALID_KEYS["train.compile_mode"])
# Seeds go into torch generators as (seed * 1_000_003 + key) * 2 + 1 (augment.py, data.py), which must stay below
# 2**64; 2**32 leaves room for any step count and is what numpy's legacy seeding accepts.
SEED_LIMIT = 2**32
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?", re.ASCII)
WANDB_FORBIDDEN = "/\\#?%:"  # characters W&B refuses in a project name
# Model keys that only some backbones read; any other arch refuses them when they differ from the default.
ARCH_KEYS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("latent", "latent_dim", "latent_kv_shared", "num_cls_tokens", "cls_pool", "class_attn",
                     "pos_embed", "patch_init", "whiten_filters", "whiten_images", "patch_drop", "pos_interp"),
                    ("vit",)),
    "class_attn_depth": ("vit", "cait"),
    **dict.fromkeys(("swin_depths", "swin_heads", "window_size"), ("swin",)),
    "layer_scale_init": ("cait",),
}


def res_stages(text: str) -> tuple[tuple[int, float], ...]:
    """train.res_schedule "16:0.25,24:0.5" -> ((16, 0.25), (24, 0.5)): (size, until this fraction of the steps)."""
    stages = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        size, _, until = part.partition(":")
        try:
            stages.append((int(size), float(until)))
        except ValueError:
            raise ConfigError(f"train.res_schedule: {part!r} must look like SIZE:FRACTION, e.g. 16:0.25") from None
    return tuple(stages)


def validate(cfg: Config) -> None:
    """Check every key's type, range and choice and the rules between keys; raise ConfigError naming the key.

    Called by every way a config is made (make_config, apply_overrides, from_dict), so a command that has a Config
    has a valid one before it reads any data or writes any file."""
    for key, t in VALID_KEYS.items():  # types and choices also of configs built in Python, not only of overrides
        section, name = key.split(".")
        coerce(key, getattr(getattr(cfg, section), name), t)
    _validate_model(cfg.model)
    _validate_data(cfg)
    _validate_aug(cfg.aug)
    _validate_optim(cfg.optim, cfg.train)
    _validate_train(cfg.train, cfg.model, cfg.optim)
    _validate_ssl(cfg.ssl, cfg.model)
    _validate_arch(cfg.model)


def _validate_model(m: ModelConfig) -> None:
    _positive("model.img_size", m.img_size)
    _check(m.patch_size > 0 and m.img_size % m.patch_size == 0,
           f"model.patch_size={m.patch_size} must divide model.img_size={m.img_size}")
    _check(m.in_chans == 3, f"model.in_chans must be 3: every dataset is read as RGB images, got {m.in_chans}")
    _at_least("model.num_classes", m.num_classes, 0, " (0: no head, a feature extractor)")
    _at_least("model.depth", m.depth, 1)
    _check(m.embed_dim >= 1 and m.num_heads >= 1, "model.embed_dim and model.num_heads must be >= 1")
    _check(m.arch == "swin" or m.embed_dim % m.num_heads == 0,  # swin has its own heads per stage
           f"model.num_heads={m.num_heads} must divide model.embed_dim={m.embed_dim}")
    _positive("model.mlp_ratio", m.mlp_ratio)
    _positive("model.norm_eps", m.norm_eps, " (LayerNorm divides by sqrt(var + eps))")
    _within("model.drop_path", m.drop_path, 0.0, 1.0, "[)")
    _check(set(m.latent) <= set("qkv") and len(set(m.latent)) == len(m.latent),
           f"model.latent must be a subset of 'qkv' (e.g. 'q', 'kv', 'qkv'), got {m.latent!r}")
    _at_least("model.latent_dim", m.latent_dim, 1)
    # a factorisation D -> r -> D with r >= D is no low-rank projection, only a larger one: not what "mla" names
    _check(not m.latent or m.latent_dim < m.embed_dim,
           f"model.latent_dim={m.latent_dim} must be smaller than model.embed_dim={m.embed_dim} for a low-rank "
           f"model.latent={m.latent!r}")
    _check(not m.latent_kv_shared or ("k" in m.latent and "v" in m.latent),
           "model.latent_kv_shared needs both k and v in model.latent")
    _check(m.num_cls_tokens >= 0, "model.num_cls_tokens must be >= 0 (0: global average pooling)")
    _check(m.num_cls_tokens or not m.class_attn_depth,
           "model.class_attn_depth needs CLS tokens (model.num_cls_tokens >= 1): class attention updates them")
    _within("model.patch_drop", m.patch_drop, 0.0, 1.0, "[)")
    _at_least("model.class_attn_depth", m.class_attn_depth, 0)
    _check(m.pos_embed != "sincos" or m.embed_dim % 4 == 0, "model.pos_embed=sincos needs embed_dim % 4 == 0")
    # No upper bound: whitening uses the first min(N, training images) images, so the smoke preset's 512 images can
    # run a study's "whiten" row at the default N.
    _at_least("model.whiten_images", m.whiten_images, 1, " (whitening is fitted on these images)")
    _check(all(d >= 1 for d in m.swin_depths) and all(h >= 1 for h in m.swin_heads),
           f"model.swin_depths and model.swin_heads must be >= 1, got {m.swin_depths} and {m.swin_heads}")
    _at_least("model.window_size", m.window_size, 1)
    _positive("model.layer_scale_init", m.layer_scale_init)


def _validate_data(cfg: Config) -> None:
    d, m, a, t = cfg.data, cfg.model, cfg.aug, cfg.train
    _at_least("data.subset", d.subset, 0, " (0: every training image)")
    _at_least("data.test_subset", d.test_subset, 0, " (0: every test image)")
    _check(d.val_images >= 0, f"data.val_images must be >= 0 (0: no validation split), got {d.val_images}")
    _check(not d.subset or d.val_images < d.subset,
           f"data.val_images={d.val_images} must be smaller than data.subset={d.subset}")
    _within("data.val_seed", d.val_seed, 0, SEED_LIMIT, "[)")
    info = DATASETS[d.dataset]  # the record the reader reads (datasets.py)
    resized = [name for name, r in DATASETS.items() if r.resized]
    size, classes, images = info.image_size, info.num_classes, info.train_images
    _check(info.resized or m.img_size == size,
           f"model.img_size={m.img_size} but {d.dataset}'s images are {size}x{size} and are not resized; use "
           f"model.img_size={size} ({', '.join(resized[:-1])} and {resized[-1]} datasets are resized to any size)")
    if not classes:  # an image folder: its classes and images are counted when it is read
        return
    _check(m.num_classes in (0, classes),
           f"model.num_classes={m.num_classes} but data.dataset={d.dataset} has {classes} classes")
    n = min(d.subset or images, images)
    _check(d.val_images < n, f"data.val_images={d.val_images} must be smaller than the {n} training images of "
                             f"{d.dataset}" + (f" (data.subset={d.subset})" if d.subset else ""))
    per_epoch = (n - d.val_images) * a.repeats
    where = (f"data.subset={n}" if d.subset else f"{n} images of {d.dataset}") + (
        f" - data.val_images={d.val_images}" if d.val_images else "")
    _check(t.batch_size <= per_epoch, f"train.batch_size={t.batch_size} is larger than the {per_epoch} samples per "
                                      f"epoch ({where} x aug.repeats={a.repeats})")


def _validate_aug(a: AugConfig) -> None:
    _at_least("aug.crop_pad", a.crop_pad, 0, " (0: no random crop)")
    _at_least("aug.randaugment_ops", a.randaugment_ops, 1, " (ops per image; aug.autoaugment=none turns it off)")
    # RandAugment's magnitude is a bin of torchvision's 31 (autoaugment.randaugment: num_bins=31)
    _within("aug.randaugment_magnitude", a.randaugment_magnitude, 0, 30)
    _within("aug.erase_p", a.erase_p, 0.0, 1.0)
    _check(0 < a.erase_area[0] <= a.erase_area[1] < 1,
           f"aug.erase_area must be (lo, hi) with 0 < lo <= hi < 1, got {a.erase_area}")
    _within("aug.erase_min_aspect", a.erase_min_aspect, 0.0, 1.0, "(]")
    _within("aug.mix_p", a.mix_p, 0.0, 1.0)
    # Beta(alpha, alpha) needs alpha > 0; timm reads 0 as "off", here aug.mixup / aug.cutmix say that
    _positive("aug.mixup_alpha", a.mixup_alpha, " (turn Mixup off with aug.mixup=false)")
    _positive("aug.cutmix_beta", a.cutmix_beta, " (turn CutMix off with aug.cutmix=false)")
    _at_least("aug.repeats", a.repeats, 1)
    _at_least("aug.chunk_images", a.chunk_images, 0, " (0: auto)")


def _validate_optim(o: OptimConfig, t: TrainConfig) -> None:
    _check(o.lr > 0, f"optim.lr must be positive, got {o.lr}")
    _check(0 <= o.min_lr <= o.lr, f"optim.min_lr must be in [0, optim.lr={o.lr}], got {o.min_lr}")
    _at_least("optim.weight_decay", o.weight_decay, 0)
    _check(all(0 <= b < 1 for b in o.betas), f"optim.betas must each be in [0, 1), got {o.betas}")
    _positive("optim.eps", o.eps, " (Adam divides by sqrt(v) + eps)")
    _at_least("optim.warmup_epochs", o.warmup_epochs, 0)
    _check(o.warmup_epochs < t.epochs, f"optim.warmup_epochs={o.warmup_epochs} must be < train.epochs={t.epochs}")
    _check(0 < o.decay_fraction <= 1, f"optim.decay_fraction must be in (0, 1], got {o.decay_fraction}")
    _positive("optim.muon_lr", o.muon_lr)
    _within("optim.muon_momentum", o.muon_momentum, 0.0, 1.0, "[)")
    _at_least("optim.muon_weight_decay", o.muon_weight_decay, 0)
    _at_least("optim.grad_clip", o.grad_clip, 0, " (0: no clipping)")


def _validate_train(t: TrainConfig, m: ModelConfig, o: OptimConfig) -> None:
    _at_least("train.epochs", t.epochs, 1)
    _at_least("train.batch_size", t.batch_size, 1)
    _within("train.label_smoothing", t.label_smoothing, 0.0, 1.0, "[)")
    _at_least("train.eval_every_epochs", t.eval_every_epochs, 0, " (0: only at the end)")
    _check(0.0 <= t.ema_decay < 1.0, f"train.ema_decay must be in [0, 1) (0: off), got {t.ema_decay}")
    stages = res_stages(t.res_schedule)
    ends = [u for _, u in stages]
    _check(all(0 < u <= 1 for u in ends) and ends == sorted(set(ends)),
           f"train.res_schedule={t.res_schedule!r}: the fractions must increase, each in (0, 1]")
    _check(all(0 < s <= m.img_size and s % m.patch_size == 0 for s, _ in stages),
           f"train.res_schedule={t.res_schedule!r}: each size must be a multiple of model.patch_size={m.patch_size} "
           f"and at most model.img_size={m.img_size}")
    _check(not stages or m.arch == "vit", f"train.res_schedule needs model.arch=vit (timm's {m.arch} is built for one "
                                          f"input size)")
    _at_least("train.max_steps", t.max_steps, 0, " (0: the whole schedule)")
    _within("train.seed", t.seed, 0, SEED_LIMIT, "[)")
    _check(DEVICE.fullmatch(t.device) is not None,
           f"train.device must be auto, cpu, cuda or cuda:N (N a GPU index), got {t.device!r}")
    _at_least("train.threads", t.threads, 0, " (0: torch's default)")
    _at_least("train.log_every_steps", t.log_every_steps, 1)
    _at_least("train.checkpoint_every_steps", t.checkpoint_every_steps, 0, " (0: at evaluations only)")
    _at_least("train.checkpoint_every_seconds", t.checkpoint_every_seconds, 0, " (0: off)")
    _at_least("train.time_budget_s", t.time_budget_s, 0, " (0: train.epochs passes)")
    _check(not t.time_budget_s or (o.warmup_epochs >= 1 and not t.res_schedule),
           "train.time_budget_s needs optim.warmup_epochs >= 1 (the step count is fixed inside the warm-up, before "
           "the learning rate depends on it) and no train.res_schedule (its stages cost differently)")
    _check(not set(t.wandb_project) & set(WANDB_FORBIDDEN),
           f"train.wandb_project must not contain any of {WANDB_FORBIDDEN}, got {t.wandb_project!r}")
    for name in ("wandb_entity", "wandb_name", "wandb_tags"):  # read only when logging to W&B
        _check(t.wandb_project or not getattr(t, name),
               f"train.{name}={getattr(t, name)!r} needs train.wandb_project (W&B logging is off without it)")


def _validate_ssl(s: SSLConfig, m: ModelConfig) -> None:
    for name in ("out_dim", "head_hidden_dim", "head_bottleneck_dim", "head_layers", "global_crops", "knn_k"):
        _at_least(f"ssl.{name}", getattr(s, name), 2 if name == "global_crops" else 1,
                  " (each teacher view teaches the other views)" if name == "global_crops" else "")
    for name in ("momentum_teacher", "center_momentum", "jitter_p", "grey_p", "solarize_p"):
        _within(f"ssl.{name}", getattr(s, name), 0.0, 1.0)
    for name in ("warmup_teacher_temp", "teacher_temp", "student_temp", "knn_temp"):
        _positive(f"ssl.{name}", getattr(s, name))
    for name in ("warmup_teacher_temp_epochs", "freeze_last_layer_epochs", "weight_decay_end", "clip_grad",
                 "local_crops", "local_size", "knn_train_images"):
        _at_least(f"ssl.{name}", getattr(s, name), 0)
    for name, (lo, hi) in (("global_scale", s.global_scale), ("local_scale", s.local_scale)):
        _check(0 < lo <= hi <= 1, f"ssl.{name} must be (lo, hi) with 0 < lo <= hi <= 1, got {(lo, hi)}")
    local = s.local_size or m.img_size // 2
    _check(s.local_crops == 0 or local % m.patch_size == 0,
           f"ssl local crops of {local} px must be a multiple of model.patch_size={m.patch_size}; set ssl.local_size")
    _check(all(0 <= p <= 1 for p in s.blur_p), f"ssl.blur_p must be probabilities in [0, 1], got {s.blur_p}")
    _check(min(s.jitter) >= 0 and s.jitter[3] <= 0.5, f"ssl.jitter must be >= 0, with hue <= 0.5, got {s.jitter}")
    _check(0 < s.blur_sigma[0] <= s.blur_sigma[1], f"ssl.blur_sigma must be (lo, hi) with 0 < lo <= hi, got "
                                                   f"{s.blur_sigma}")


def refuse_unread(cfg: Config, base: Config, unread: tuple[str, ...], command: str) -> None:
    """Refuse keys that `command` does not read (dotted keys, or sections as "ssl.") when they differ from `base`
    (the preset's config): a value that cannot change the run would otherwise be recorded as if it had."""
    hit = {k: v for k, v in diff(cfg, base).items() if any(k == u or (u.endswith(".") and k.startswith(u))
                                                           for u in unread)}
    it = "it" if len(hit) == 1 else "them"
    _check(not hit, f"{', '.join(f'{k}={v}' for k, v in hit.items())}: not read by `smallvit {command}`, so it "
                    f"would change nothing; drop {it}")


def _validate_arch(m: ModelConfig) -> None:
    """The keys of each backbone (reference §11); a key the arch does not read is refused by name."""
    default = ModelConfig()
    for key, users in ARCH_KEYS.items():
        value = getattr(m, key)
        _check(value == getattr(default, key) or m.arch in users,
               f"model.{key}={value!r} is not supported by model.arch={m.arch} (only by {' and '.join(users)}); "
               f"drop it or choose model.arch={users[0]}")
    if m.arch == "swin":
        n, grid = len(m.swin_depths), m.img_size // m.patch_size
        _check(len(m.swin_heads) == n, f"model.swin_heads={m.swin_heads} needs one entry per stage of "
                                       f"model.swin_depths={m.swin_depths}")
        for i, h in enumerate(m.swin_heads):
            size, dim = grid // 2**i, m.embed_dim * 2**i
            _check(grid % 2**i == 0, f"swin: the {grid}x{grid} patch grid cannot be halved {i} times for stage "
                                     f"{i + 1}; use fewer stages or a smaller model.patch_size")
            _check(dim % h == 0, f"model.swin_heads[{i}]={h} must divide stage {i + 1}'s width {dim}")
            _check(size <= m.window_size or size % m.window_size == 0,
                   f"swin: stage {i + 1}'s {size}x{size} grid is not a multiple of model.window_size={m.window_size}")
    if m.arch == "cait":
        _check(m.class_attn_depth >= 1, "model.arch=cait needs model.class_attn_depth >= 1 (its CLS token is "
                                        "updated only there)")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> Config:
    """Rebuild a Config from `to_dict` output (e.g. a run's config.json); unknown keys raise ConfigError."""
    flat = {f"{s}.{k}": v for s, sub in d.items() for k, v in sub.items()}
    return apply_overrides(Config(), flat)


def diff(cfg: Config, base: Config | None = None) -> dict[str, object]:
    """Dotted keys whose values differ from `base` (the baseline by default)."""
    a, b = to_dict(cfg), to_dict(base or Config())
    return {f"{s}.{k}": v for s in a for k, v in a[s].items() if b[s][k] != v}
