"""The two learned predictors of Dynamic-LLaVA, with the official architecture and parameter names.

Official state-dict keys (under `model.image_score_predictor.` / `model.output_text_score_predictor.`) load into
these modules unchanged: `down_mlp.{0,1}`, `transformer.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`,
`output_mlp.{0,2,4}` for the image predictor; `output_mlp.{0,1,3,5,7}` for the output-text predictor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ViTAttention(nn.Module):
    """timm-style multi-head self-attention: fused qkv without bias, output projection with bias, no mask."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, N, C]
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, H, N, Dh]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class ViTMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):
    """Pre-norm transformer block (the official `SelfTransformerEncoderBlock` at inference: no layer-scale,
    no drop-path, LayerNorm eps 1e-5)."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ViTAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = ViTMlp(dim, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionPredictor(nn.Module):
    """Scores image tokens. Input: hidden states of one image's tokens entering decoder layer l.
    Output: 2 logits per token (channel 0 = keep); the keep score is the margin logit[0] - logit[1]."""

    def __init__(self, input_dim: int, d_model: int = 512, nhead: int = 8, dim_feedforward: int = 2048,
                 num_layers: int = 2):
        super().__init__()
        self.down_mlp = nn.Sequential(nn.LayerNorm(input_dim), nn.Linear(input_dim, d_model), nn.GELU())
        self.transformer = nn.Sequential(*[ViTBlock(d_model, nhead, dim_feedforward) for _ in range(num_layers)])
        self.output_mlp = nn.Sequential(
            nn.Linear(d_model, d_model // 2), nn.GELU(),
            nn.Linear(d_model // 2, d_model // 4), nn.GELU(),
            nn.Linear(d_model // 4, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, N, D] (all N tokens belong to one image per row) -> logits [B, N, 2]
        h = self.transformer(self.down_mlp(x))  # [B, N, C]
        c = h.shape[-1]
        local_feat = h[..., : c // 2]
        global_feat = h[..., c // 2:].mean(dim=1, keepdim=True).expand_as(local_feat)  # policy is all ones
        return self.output_mlp(torch.cat([local_feat, global_feat], dim=-1))

    def keep_scores(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, N, D] -> keep margins [B, N] in fp32, logit[0] - logit[1]; higher means keep.

        The official code ranks by log_softmax(logits)[..., 0] = -softplus(-margin): the same order, except that
        in fp32 it saturates to exactly 0.0 for every margin beyond ~17, and the kept set is then decided by each
        library's tie-breaking. The margin does not saturate; see `top_k_in_order` for ties."""
        logits = self.forward(x).float()
        return logits[..., 0] - logits[..., 1]


def top_k_in_order(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ranking rule of every backend: indices of the k highest scores along the last axis, equal scores ->
    the lower index first, returned in ascending (original) order. scores [..., N] -> [..., k].

    A stable descending sort, not `torch.topk`, whose order among equal values is unspecified (and differs from
    ONNX TopK's, which keeps the lower index first like this)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[..., :k].sort(dim=-1).values


class TextPredictor(nn.Module):
    """Decides per generated token whether its K/V enter the caches of layers >= l: keep iff the margin
    logit0 - logit1 > t. t = 0 is the trained rule (logit0 > logit1); a deploy-time threshold t (`dynllava
    calibrate`, the calibration record) moves the kept share: a higher t keeps fewer tokens."""

    def __init__(self, input_dim: int, d_model: int = 512):
        super().__init__()
        self.output_mlp = nn.Sequential(
            nn.LayerNorm(input_dim), nn.Linear(input_dim, d_model), nn.GELU(),
            nn.Linear(d_model, d_model // 2), nn.GELU(),
            nn.Linear(d_model // 2, d_model // 4), nn.GELU(),
            nn.Linear(d_model // 4, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., D] -> [..., 2]
        return self.output_mlp(x)

    def margin(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., D] -> logit0 - logit1 [...]
        logits = self(x)
        return logits[..., 0] - logits[..., 1]

    def keep(self, x: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
        # x: [..., D] -> bool [...]; at threshold 0 exactly logit0 > logit1 (a - b > 0 iff a > b in IEEE floats)
        return self.margin(x) > threshold
