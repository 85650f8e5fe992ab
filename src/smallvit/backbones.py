"""The backbone interface (Backbone), the reference's other backbones (reference §11) built from timm's own classes, and
the one `build_model`.

`model.arch` picks the class: vit (this package's ViT, model.py), swin (timm's SwinTransformer) or cait (timm's
Cait). The timm models are used as they are; the subclasses below only translate a ModelConfig into timm's
constructor arguments and add what the rest of smallvit reads from every model (Backbone). A new backbone is one
class that provides Backbone, plus its entry in ARCHS (and its config keys); tests/test_backbones.py checks every
entry against the interface.
"""

from __future__ import annotations

import functools
from typing import Protocol, runtime_checkable

import torch
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models.cait import Cait as TimmCait
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from .config import ModelConfig
from .model import ViT


@runtime_checkable
class Backbone(Protocol):
    """What train, pretrain (DINO), knn, evaluate, export and inspect read from a model of any `model.arch`.

    Calling it maps images (B, C, H, W) to logits (B, cfg.num_classes), or to `pooled` features when
    cfg.num_classes == 0 (DINO's backbone). Images of another size than cfg.img_size (DINO's local views) work when
    built with build_model(cfg, any_size=True). no_weight_decay() names the tensors that get no weight decay and no
    Muon (optim.param_groups).
    """

    cfg: ModelConfig  # the config it was built from (input size, classes, pooling)
    grid: int  # patches per side at cfg.img_size
    num_cls: int  # CLS tokens (0: the head reads an average of the patch tokens)
    feature_dim: int  # the width of what the head reads

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised tokens the head pools, (B, K, D): the CLS tokens, or one average token (K = 1)."""
        ...

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """What the head reads, (B, feature_dim)."""
        ...

    def no_weight_decay(self) -> set[str]: ...


class Swin(SwinTransformer):
    """reference §11.1: shifted-window stages (patch merging doubles the width), no absolute position embedding,
    LayerNorm after the patch embedding, average pooling, drop path linear from 0 over all blocks.
    `any_size`: timm's attention masks built for each input's size (DINO's local views), the same numbers at
    cfg.img_size."""

    def __init__(self, cfg: ModelConfig, any_size: bool = False):
        super().__init__(
            img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=cfg.num_classes,
            global_pool="avg", embed_dim=cfg.embed_dim, depths=cfg.swin_depths, num_heads=cfg.swin_heads,
            window_size=cfg.window_size, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
            drop_path_rate=cfg.drop_path, norm_layer=functools.partial(nn.LayerNorm, eps=cfg.norm_eps),
            strict_img_size=not any_size,
        )
        self.cfg = cfg
        self.grid = cfg.img_size // cfg.patch_size
        self.num_cls = 0
        self.feature_dim = self.num_features

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x), pre_logits=True)  # (B, feature_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pooled(x).unsqueeze(1)  # (B, 1, feature_dim)


class Cait(TimmCait):
    """reference §11.2: talking-heads self-attention over the patches only (position embedding on the patches),
    LayerScale on every branch, then class-attention blocks (MLP ratio 4, no drop path) that update the CLS token;
    drop path constant over the self-attention blocks. Other input sizes resample the position table (timm's
    resample_abs_pos_embed, as smallvit's ViT)."""

    def __init__(self, cfg: ModelConfig, any_size: bool = False):
        super().__init__(
            img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=cfg.num_classes,
            global_pool="token", embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, drop_path_rate=cfg.drop_path,
            norm_layer=functools.partial(nn.LayerNorm, eps=cfg.norm_eps), init_values=cfg.layer_scale_init,
            depth_token_only=cfg.class_attn_depth, mlp_ratio_token_only=4.0,  # reference §11.2: the reference's 4.0
        )
        self.cfg = cfg
        self.grid = cfg.img_size // cfg.patch_size
        self.num_cls = 1
        self.feature_dim = self.num_features
        self.patch_embed.strict_img_size = not any_size
        # The reference's CaiT embeds patches with a Linear (models/cait.py 192-195) that its _init_weights starts
        # at trunc-normal(0.02) with a zero bias (lines 236-240); timm's conv keeps PyTorch's default (std about
        # 0.083 at patch 4, and a non-zero bias). The same weights as a conv, so the reference's start.
        trunc_normal_(self.patch_embed.proj.weight, std=0.02)
        nn.init.zeros_(self.patch_embed.proj.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """timm's, with the position table resampled for another input size."""
        pos = self.pos_embed
        h, w = x.shape[-2] // self.cfg.patch_size, x.shape[-1] // self.cfg.patch_size
        if (h, w) != (self.grid, self.grid):
            pos = resample_abs_pos_embed(pos, [h, w], [self.grid, self.grid], num_prefix_tokens=0)
        x = self.pos_drop(self.patch_embed(x) + pos)  # (B, N, D)
        x = self.forward_cls(self.blocks(x))  # (B, 1 + N, D)
        return self.norm(x)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x), pre_logits=True)  # (B, feature_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[:, :1]  # (B, 1, D): the CLS token the head reads


ARCHS: dict[str, type[nn.Module]] = {"vit": ViT, "swin": Swin, "cait": Cait}


def build_model(cfg: ModelConfig, any_size: bool = False) -> nn.Module:
    """The model of `cfg.arch` (a Backbone), freshly initialised (the caller seeds torch). `any_size`: accept
    inputs of other sizes than cfg.img_size (DINO's local views; the ViT always does)."""
    return ViT(cfg) if cfg.arch == "vit" else ARCHS[cfg.arch](cfg, any_size=any_size)
