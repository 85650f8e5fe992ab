"""The reference's other backbones (SPEC 11), built from timm's own classes, and the one `build_model`.

`model.arch` picks the class: vit (this package's ViT, model.py), swin (timm's SwinTransformer) or cait (timm's
Cait). The timm models are used as they are; the subclasses below only translate a ModelConfig into timm's
constructor arguments and add what the rest of smallvit reads from every model: `cfg` (input size, classes), and
for the CLS-token models `grid` and `num_cls` (attention inspection).
"""

from __future__ import annotations

import functools

from timm.layers import trunc_normal_
from timm.models.cait import Cait as TimmCait
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from .config import ModelConfig
from .model import ViT


class Swin(SwinTransformer):
    """SPEC 11.1: shifted-window stages (patch merging doubles the width), no absolute position embedding,
    LayerNorm after the patch embedding, average pooling, drop path linear from 0 over all blocks."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(
            img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=cfg.num_classes,
            global_pool="avg", embed_dim=cfg.embed_dim, depths=cfg.swin_depths, num_heads=cfg.swin_heads,
            window_size=cfg.window_size, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
            drop_path_rate=cfg.drop_path, norm_layer=functools.partial(nn.LayerNorm, eps=cfg.norm_eps),
        )
        self.cfg = cfg


class Cait(TimmCait):
    """SPEC 11.2: talking-heads self-attention over the patches only (position embedding on the patches),
    LayerScale on every branch, then class-attention blocks (MLP ratio 4, no drop path) that update the CLS token;
    drop path constant over the self-attention blocks."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(
            img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=cfg.num_classes,
            global_pool="token", embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, drop_path_rate=cfg.drop_path,
            norm_layer=functools.partial(nn.LayerNorm, eps=cfg.norm_eps), init_values=cfg.layer_scale_init,
            depth_token_only=cfg.class_attn_depth, mlp_ratio_token_only=4.0,  # SPEC 11.2: the reference's 4.0
        )
        self.cfg = cfg
        self.grid = cfg.img_size // cfg.patch_size
        self.num_cls = 1
        # The reference's CaiT embeds patches with a Linear (models/cait.py 192-195) that its _init_weights starts
        # at trunc-normal(0.02) with a zero bias (lines 236-240); timm's conv keeps PyTorch's default (std about
        # 0.083 at patch 4, and a non-zero bias). The same weights as a conv, so the reference's start.
        trunc_normal_(self.patch_embed.proj.weight, std=0.02)
        nn.init.zeros_(self.patch_embed.proj.bias)


ARCHS: dict[str, type[nn.Module]] = {"vit": ViT, "swin": Swin, "cait": Cait}


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model of `cfg.model.arch`, freshly initialised (the caller seeds torch)."""
    return ARCHS[cfg.arch](cfg)
