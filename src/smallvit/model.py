"""The paper's ViT (reference §6) with every design knob it studies as a constructor option.

One model, no copies: low-rank q/k/v (MLA), several CLS tokens or none (global average pooling), class-attention
blocks, learned or fixed 2-D sin-cos position embedding, patch dropout. Whitening init of the patch embedding lives in
`whiten.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchDropout, trunc_normal_
from torch import nn

from .config import ModelConfig


def sincos_pos_embed(grid_h: int, grid_w: int, dim: int, num_cls: int = 0) -> torch.Tensor:
    """Fixed 2-D sin-cos table (num_cls + grid_h*grid_w, dim), MoCo-v3 layout: [sin r, cos r, sin c, cos c].

    Token r*grid_w + c gets row r and column c; the CLS rows are zero. Any grid and any number of CLS
    tokens (the reference hard-codes 8x8 and one CLS row, reference §12.4).
    """
    assert dim % 4 == 0, "sin-cos position embedding needs dim % 4 == 0"
    p = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(p, dtype=torch.float64) / p))  # (P,)
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    r = rows.reshape(-1, 1).double() * omega  # (N, P)
    c = cols.reshape(-1, 1).double() * omega
    table = torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1)  # (N, D)
    return torch.cat([torch.zeros(num_cls, dim, dtype=torch.float64), table]).float()


def dino_interpolate_pos(pos: torch.Tensor, h: int, w: int, num_cls: int) -> torch.Tensor:
    """(1, K + N, D) table -> (1, K + h*w, D) as DINO's interpolate_pos_encoding (vision_transformer.py, and the
    parent's models/vit.py 178-198): bicubic with scale_factor (h + 0.1) / sqrt(N). Given a scale factor,
    F.interpolate maps output point i to input (i + 0.5) * sqrt(N) / (h + 0.1) - 0.5, not (i + 0.5) * sqrt(N) / h
    - 0.5 as resizing to h would: the samples shift slightly towards the table's first rows and columns."""
    cls, grid = pos[:, :num_cls], pos[:, num_cls:]
    n = int(round(grid.shape[1] ** 0.5))
    table = grid.reshape(1, n, n, -1).permute(0, 3, 1, 2)  # (1, D, n, n)
    table = F.interpolate(table, scale_factor=((h + 0.1) / n, (w + 0.1) / n), mode="bicubic")
    assert table.shape[-2:] == (h, w), f"DINO's interpolation gave {tuple(table.shape[-2:])}, not {(h, w)}"
    return torch.cat([cls, table.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)


class LowRankLinear(nn.Sequential):
    """D -> r (no bias) -> D (bias): the reference's 'latent' projection (reference §6.6)."""

    def __init__(self, dim: int, rank: int, bias: bool):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=bias)


class CpuAttention(torch.autograd.Function):
    """Softmax attention of packed q, k, v (B, N, 3D) with `heads` heads -> (B, N, D), for tensors on the CPU.

    Written by hand because torch's CPU scaled_dot_product_attention (its flash kernel) is slow at a small ViT's
    sizes: 64 tokens with heads of 16-32 channels take about 1.5x the time of batched matrix products and a softmax
    (benchmarks/bench_train.py prints the model-only step against timm's ViT, which uses it). Each head's q, k, v
    are read in place from the packed projections (strided matrices, no copy to a heads-first layout, forward or
    backward), and the backward is written out: softmax'(s) g = a * (g - rowsum(a * g)), the row sums taken from the
    output. Same result as F.scaled_dot_product_attention to float rounding (tests/test_model.py).
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, heads: int) -> torch.Tensor:
        B, N, D3 = qkv.shape
        d = D3 // 3 // heads
        parts = qkv.view(B, N, 3, heads, d)
        out = qkv.new_empty(B, N, heads, d)
        probs = []
        for h in range(heads):
            q, k, v = parts[:, :, 0, h], parts[:, :, 1, h], parts[:, :, 2, h]  # (B, N, d) each
            a = torch.bmm(q * d**-0.5, k.transpose(1, 2)).softmax(-1)  # (B, N, N); baddbmm's alpha is slower
            out[:, :, h] = torch.bmm(a, v)
            probs.append(a)
        out = out.view(B, N, heads * d)
        ctx.save_for_backward(qkv, out, *probs)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        qkv, out, *probs = ctx.saved_tensors
        B, N, D3 = qkv.shape
        heads = len(probs)
        d = D3 // 3 // heads
        parts, g = qkv.view(B, N, 3, heads, d), g.view(B, N, heads, d)
        # rowsum(a * g_a) = rowsum(g * out) per head (FlashAttention's D): a pass over (B, N, d), not (B, N, N)
        rowsums = (g * out.view(B, N, heads, d)).sum(-1, keepdim=True)  # (B, N, heads, 1)
        grad = torch.empty_like(qkv)
        grads = grad.view(B, N, 3, heads, d)
        for h, a in enumerate(probs):
            q, k, v, gh = parts[:, :, 0, h], parts[:, :, 1, h], parts[:, :, 2, h], g[:, :, h]
            grads[:, :, 2, h] = torch.bmm(a.transpose(1, 2), gh)  # dv
            ga = torch.bmm(gh, v.transpose(1, 2))  # d loss / d a
            ga.sub_(rowsums[:, :, h]).mul_(a)  # d loss / d scores: a * (g_a - rowsum(a * g_a))
            grads[:, :, 0, h] = torch.bmm(ga, k).mul_(d**-0.5)  # dq
            grads[:, :, 1, h] = torch.bmm(ga.transpose(1, 2), q).mul_(d**-0.5)  # dk
        return grad, None


def sdpa_attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """CpuAttention's result with torch's scaled_dot_product_attention (its fused kernels on a GPU), scale d^-0.5
    as the reference."""
    B, N, D3 = qkv.shape
    q, k, v = qkv.view(B, N, 3, heads, D3 // 3 // heads).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, N, d) each
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D3 // 3)


class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v projections, any subset of them low-rank.

    The three full projections run as one matrix product (their weights concatenated, as timm's fused qkv Linear;
    the parameters stay separate, so checkpoints and the weight map to timm are unchanged).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, latent: str = "", latent_dim: int = 64,
                 kv_shared: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.kv_shared = kv_shared
        full = lambda: nn.Linear(dim, dim, bias=qkv_bias)
        low = lambda: LowRankLinear(dim, latent_dim, qkv_bias)
        self.q = low() if "q" in latent else full()
        if kv_shared:  # one latent for k and v: down once, then two up-projections
            self.kv_down = nn.Linear(dim, latent_dim, bias=False)
            self.k = nn.Linear(latent_dim, dim, bias=qkv_bias)
            self.v = nn.Linear(latent_dim, dim, bias=qkv_bias)
        else:
            self.k = low() if "k" in latent else full()
            self.v = low() if "v" in latent else full()
        self.fused = not kv_shared and not latent
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x):
        if self.kv_shared:
            z = self.kv_down(x)  # (B, N, r)
            return self.q(x), self.k(z), self.v(z)
        return self.q(x), self.k(x), self.v(x)

    def _packed_qkv(self, x):  # (B, N, D) -> (B, N, 3D): q, k, v side by side
        if self.fused:
            bias = torch.cat([self.q.bias, self.k.bias, self.v.bias]) if self.q.bias is not None else None
            return F.linear(x, torch.cat([self.q.weight, self.k.weight, self.v.weight]), bias)
        return torch.cat(self._qkv(x), dim=-1)

    def _heads(self, x):  # (B, N, D) -> (B, h, N, d)
        B, N, _ = x.shape
        return x.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self._packed_qkv(x)
        # CpuAttention is eager PyTorch's CPU path; tracers and compilers (ONNX, TorchScript, torch.export, inductor)
        # get torch's attention op, which they know how to lower (the legacy ONNX exporter mistraces the per-head
        # writes of CpuAttention's forward).
        traced = torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()
        attend = CpuAttention.apply if x.device.type == "cpu" and not traced else sdpa_attention
        return self.proj(attend(qkv, self.num_heads))

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention weights (B, h, N, N), for inspection."""
        q, k, _ = (self._heads(t) for t in self._qkv(x))
        return (q @ k.transpose(-2, -1) * self.head_dim**-0.5).softmax(-1)


class ClassAttention(nn.Module):
    """CLS tokens attend to all tokens (reference §6.7). `project_patches`: the reference's projO on the patches."""

    def __init__(self, dim: int, num_heads: int, num_cls: int, qkv_bias: bool = True, project_patches: bool = True):
        super().__init__()
        self.num_heads, self.head_dim, self.num_cls = num_heads, dim // num_heads, num_cls
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_patches = nn.Linear(dim, dim) if project_patches else None

    def _heads(self, x):
        B, N, _ = x.shape
        return x.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        cls, patches = x[:, : self.num_cls], x[:, self.num_cls :]
        q = self._heads(self.q(cls))  # (B, h, K, d)
        out = F.scaled_dot_product_attention(q, self._heads(self.k(x)), self._heads(self.v(x)))
        cls = self.proj(out.transpose(1, 2).reshape(B, self.num_cls, D))  # (B, K, D)
        patches = self.proj_patches(patches) if self.proj_patches is not None else torch.zeros_like(patches)
        return torch.cat([cls, patches], dim=1)

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        q = self._heads(self.q(x[:, : self.num_cls]))
        return (q @ self._heads(self.k(x)).transpose(-2, -1) * self.head_dim**-0.5).softmax(-1)


class Block(nn.Module):
    """Pre-norm transformer block; `attn` is self-attention or class attention."""

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float, drop_path: float, eps: float,
                 cls_only: int = 0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = attn
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.cls_only = cls_only  # CaiT: only the first `cls_only` tokens are updated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cls_only:
            k = self.cls_only
            cls = x[:, :k] + self.drop_path(self.attn(self.norm1(x))[:, :k])
            cls = cls + self.drop_path(self.mlp(self.norm2(cls)))
            return torch.cat([cls, x[:, k:]], dim=1)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """Vision Transformer of the paper, configured by a ModelConfig."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D, K = cfg.embed_dim, cfg.num_cls_tokens
        self.grid = cfg.img_size // cfg.patch_size
        self.num_cls = K  # 0: no CLS token, the head reads the mean of the patch tokens (global average pooling)
        self.patch_embed = nn.Conv2d(cfg.in_chans, D, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, K, D)) if K else None
        n_tokens = K + self.grid * self.grid
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, D))
        else:  # a buffer: fixed, not trained, saved in the state dict
            self.register_buffer("pos_embed", sincos_pos_embed(self.grid, self.grid, D, K).unsqueeze(0))
        # Training only: a random (1 - patch_drop) of the patch tokens go through the blocks (timm's PatchDropout,
        # Liu et al. 2022, "PatchDropout"), so a step costs about that fraction; evaluation sees every token.
        self.patch_drop = PatchDropout(cfg.patch_drop, num_prefix_tokens=K) if cfg.patch_drop > 0 else nn.Identity()
        total = cfg.depth + cfg.class_attn_depth
        # One linear drop-path schedule over all blocks; class-attention blocks continue it (fixes reference §12.14).
        dpr = [cfg.drop_path * i / max(total - 1, 1) for i in range(total)]
        self.blocks = nn.ModuleList(
            Block(D, Attention(D, cfg.num_heads, cfg.qkv_bias, cfg.latent, cfg.latent_dim, cfg.latent_kv_shared),
                  cfg.mlp_ratio, dpr[i], cfg.norm_eps)
            for i in range(cfg.depth)
        )
        cait = cfg.class_attn == "cait"
        self.cls_blocks = nn.ModuleList(
            Block(D, ClassAttention(D, cfg.num_heads, K, cfg.qkv_bias, project_patches=not cait),
                  cfg.mlp_ratio, dpr[cfg.depth + i], cfg.norm_eps, cls_only=K if cait else 0)
            for i in range(cfg.class_attn_depth)
        )
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.feature_dim = K * D if cfg.cls_pool == "concat" and K else D  # what the head reads
        self.head = nn.Linear(self.feature_dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self):
        K = self.num_cls
        # reference §6.8: trunc-normal(0.02) linears with zero bias, LayerNorm 1/0, tokens trunc-normal(0.02);
        # the patch-embedding conv keeps PyTorch's default init.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if K:
            trunc_normal_(self.cls_token, std=0.02)
        if isinstance(self.pos_embed, nn.Parameter):
            trunc_normal_(self.pos_embed, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"}

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> token sequence after the embedding (B, K + N, D)."""
        x = self.patch_embed(x)  # (B, D, h, w)
        pos = self.pos_embed
        if x.shape[-2:] != (self.grid, self.grid):  # another resolution (DINO's local crops): resize the table
            if self.cfg.pos_interp == "dino":
                pos = dino_interpolate_pos(pos, *x.shape[-2:], self.num_cls)
            else:
                from timm.layers import resample_abs_pos_embed

                # bicubic without antialiasing, sampled at the target grid's own points (align_corners=False on
                # the target size). Not DINO's: that one passes a scale factor, see dino_interpolate_pos.
                pos = resample_abs_pos_embed(pos, list(x.shape[-2:]), [self.grid, self.grid], self.num_cls,
                                             antialias=False)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D), a view of the (B, D, h, w) convolution output
        if not self.num_cls:  # contiguous: else the sum keeps the view's layout through every block, and each
            return (x + pos).contiguous()  # layer norm (forward and backward) copies its input to row-major
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, K, D)
        return torch.cat([cls, x], dim=1) + pos

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The K CLS features after the final norm (B, K, D); with no CLS token, the mean of the normalised patch
        tokens (B, 1, D), as big_vision's `gap` pooling."""
        x = self.patch_drop(self.tokens(x))
        for blk in self.blocks:
            x = blk(x)
        for blk in self.cls_blocks:
            x = blk(x)
        x = self.norm(x)
        return x[:, : self.num_cls] if self.num_cls else x.mean(1, keepdim=True)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """What the head reads (B, feature_dim): the K CLS features concatenated (cls_pool=concat) or averaged."""
        f = self.features(x)  # (B, K, D)
        return f.flatten(1) if self.cfg.cls_pool == "concat" else f.mean(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(x))  # (B, num_classes), or (B, feature_dim) with num_classes=0


class GlobalDropPath(DropPath):
    """timm's DropPath whose per-sample masks are drawn for the global batches and cut to this process's shard
    (a data.Shard), so that under torchrun every sample gets the mask it gets in one process."""

    def __init__(self, drop_prob: float, scale_by_keep: bool, shard):
        super().__init__(drop_prob, scale_by_keep)
        self.shard = shard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        shape = (self.shard.global_n(x.shape[0]),) + (1,) * (x.ndim - 1)
        mask = self.shard.pick(x.new_empty(shape).bernoulli_(keep))  # timm's draw, for the global batches
        if keep > 0.0 and self.scale_by_keep:
            mask.div_(keep)
        return x * mask


class GlobalPatchDropout(PatchDropout):
    """timm's PatchDropout whose token choice is drawn for the global batches and cut to this process's shard."""

    def __init__(self, prob: float, num_prefix_tokens: int, ordered: bool, shard):
        super().__init__(prob, num_prefix_tokens, ordered)
        self.shard = shard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.prob == 0.0:
            return x
        # timm's patch_dropout_forward draws torch.randn(B, L) and keeps the argsort's first tokens; the same
        # draw, made for the global batches, then this shard's rows.
        k = self.num_prefix_tokens
        noise = self.shard.pick(torch.randn(self.shard.global_n(x.shape[0]), x.shape[1] - k, device=x.device))
        keep = noise.argsort(dim=-1)[:, : max(1, int(noise.shape[1] * (1.0 - self.prob)))]
        if self.ordered:
            keep = keep.sort(dim=-1)[0]
        patches = x[:, k:].gather(1, keep.unsqueeze(-1).expand((-1, -1) + x.shape[2:]))
        return torch.cat((x[:, :k], patches), dim=1) if k else patches


def draw_for_global_batch(model: nn.Module, shard) -> nn.Module:
    """Make the model's random layers (drop path, patch dropout; timm's backbones included) draw for the global
    batches of `shard` (a data.Shard) and keep this process's rows; in one process they draw exactly as before.

    Every batch the model sees in training must then be a whole number of shards (several views are fine).
    Returns the model.
    """
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is DropPath:
                setattr(parent, name, GlobalDropPath(child.drop_prob, child.scale_by_keep, shard))
            elif type(child) is PatchDropout:
                setattr(parent, name, GlobalPatchDropout(child.prob, child.num_prefix_tokens, child.ordered, shard))
            elif isinstance(child, nn.Dropout) and child.p > 0:  # would draw per process: refuse, not differ
                raise ValueError(f"{name}: nn.Dropout(p={child.p}) has no global-batch draw; set its rate to 0")
    return model


def count_params(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def flops_per_image(model: nn.Module) -> int:
    """Forward FLOPs for one image (multiply-add = 2 FLOPs), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    # torch's counter has a formula for the CUDA kernels of scaled_dot_product_attention, none for the CPU one
    # (timm's backbones and ClassAttention use it): count it the same, so attention is in the total on any device.
    cpu_sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)}
    c = model.cfg
    x = torch.zeros(1, c.in_chans, c.img_size, c.img_size, device=next(model.parameters()).device)
    was = model.training
    model.eval()
    # Not under no_grad: the counter's module tracker fails on timm's CaiT there (an expanded parameter
    # that requires grad without a grad_fn); the forward's graph is discarded.
    with FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as fc:
        model(x)
    model.train(was)
    return int(fc.get_total_flops())

