"""The training forward of Dynamic-LLaVA (paper Sec. 3.3.3), through the same DynamicLlava modules inference runs.

Inference drops tokens; training keeps the full sequence and masks instead:

* layers < l run dense (every token, causal mask), exactly as at inference;
* at layer l the image predictor scores the image tokens and the output-text predictor the generated tokens fed
  back (answer tokens); each decision is Gumbel-Softmax sampled with a straight-through hard mask (Eq. 8-9), channel
  0 = keep;
* layers >= l attend through a masked softmax (Eq. 7): a key token dropped by its mask is invisible to every other
  query, every token still attends to itself (diag(G) = 1), so a dropped answer token still predicts the next one;
* the mask loss (Eq. 10) pulls each sample's kept share toward r_I and (for samples with at least LEN^OT decided
  tokens) r_OT, weighted by lambda.

`dense=True` (the first stage) skips the predictors: plain LLaVA-1.5 training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import repeat_kv

from dynllava.model.sparse_llama import DynamicLlava, layer_forward, rotated_qkv, self_attention_mask
from dynllava.training.data import IGNORE, Batch


@dataclass
class ForwardOut:
    loss: torch.Tensor  # what is minimised: lm_loss + lambda * mask_loss
    lm_loss: torch.Tensor
    mask_loss: torch.Tensor
    image_keep: float  # share of image tokens the sampled masks kept (nan when dense)
    text_keep: float  # share of decided answer tokens the sampled masks kept (nan when dense or none decided)


def masked_layer_forward(layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, allowed: torch.Tensor,
                         gate: torch.Tensor) -> torch.Tensor:
    """One LLaMA decoder layer with MaskedSoftmax (Eq. 7).

    h: [B, S, D]; allowed: bool [B, 1, S, S] (causal, not padding, diagonal always); gate: [B, S] per key token,
    0/1 in the forward pass with straight-through gradients, 1 for tokens no predictor decides on."""
    attn = layer.self_attn
    b, s, _ = h.shape
    q, k, v = rotated_qkv(layer, h, cos, sin)  # [B, Hq, S, Dh], [B, Hkv, S, Dh] x 2
    k, v = repeat_kv(k, attn.num_key_value_groups), repeat_kv(v, attn.num_key_value_groups)
    scores = (q @ k.transpose(-1, -2)) * attn.scaling  # [B, Hq, S, S]
    scores = scores.masked_fill(~allowed, float("-inf"))
    scores = scores - scores.amax(-1, keepdim=True).detach()
    eye = torch.eye(s, dtype=torch.bool, device=h.device)
    g = torch.where(eye, torch.ones_like(gate)[:, None, :], gate[:, None, :])[:, None]  # [B, 1, S, S]
    weights = scores.exp() * g
    weights = weights / weights.sum(-1, keepdim=True)
    out = weights @ v  # [B, Hq, S, Dh]
    h = h + attn.o_proj(out.transpose(1, 2).reshape(b, s, -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


def _gumbel_keep(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """logits [..., 2] (channel 0 = keep) -> hard 0/1 keep mask [...] with straight-through gradients (Eq. 8-9)."""
    return F.gumbel_softmax(logits.float(), tau=tau, hard=True, dim=-1)[..., 0]


def training_forward(model: DynamicLlava, batch: Batch, dense: bool, tau: float = 1.0) -> ForwardOut:
    sparse = model.sparse
    feats = model.encode_images(batch.pixel_values)  # [B, N, D]
    n, off = feats.shape[1], batch.image_offset
    tokens = model.language_model.embed_tokens(batch.input_ids)  # [B, S, D]
    h = torch.cat([tokens[:, :off], feats.to(tokens.dtype), tokens[:, off + n:]], dim=1)
    b, s, _ = h.shape
    positions = torch.arange(s)[None].expand(b, s)
    cos, sin = model.language_model.rotary_emb(h, positions)
    allowed = self_attention_mask(batch.valid)  # [B, 1, S, S]
    layers = model.language_model.layers
    l = model.sparse_layer
    for layer in layers[:l]:
        h = layer_forward(layer, h, cos, sin, None, None, allowed)[0]

    zero = h.new_zeros(())
    mask_loss, image_keep, text_keep = zero, float("nan"), float("nan")
    if dense:
        for layer in layers[l:]:
            h = layer_forward(layer, h, cos, sin, None, None, allowed)[0]
    else:
        image_mask = _gumbel_keep(model.image_score_predictor(h[:, off: off + n]), tau)  # [B, N]
        text_mask = _gumbel_keep(model.output_text_score_predictor(h), tau)  # [B, S]
        counts = batch.decided.sum(1)  # [B] decided tokens per sample
        sparsified = batch.decided & (counts >= sparse.output_text_len_for_training)[:, None]  # [B, S]
        ones = torch.ones_like(text_mask)
        gate = torch.where(sparsified, text_mask, ones)
        gate = torch.cat([gate[:, :off], image_mask, gate[:, off + n:]], dim=1)  # [B, S]
        for layer in layers[l:]:
            h = masked_layer_forward(layer, h, cos, sin, allowed, gate.to(h.dtype))
        image_share = image_mask.mean(1)  # [B]
        mask_loss = ((image_share - sparse.vision_keep_rate) ** 2).mean()
        image_keep = image_share.mean().item()
        rows = sparsified.any(1)
        if rows.any():
            text_share = (text_mask * sparsified).sum(1)[rows] / counts[rows]  # [B']
            mask_loss = mask_loss + ((text_share - sparse.output_text_keep_rate) ** 2).mean()
            text_keep = text_share.mean().item()

    logits = model.lm_head(model.language_model.norm(h))  # [B, S, V]
    if batch.weights is None:  # the plain mean as before (the shipped weights rebuild bit for bit)
        lm_loss = F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten(), ignore_index=IGNORE)
    else:  # a weighted mean over the answer tokens (weights are 0 where labels are IGNORE)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten(), ignore_index=IGNORE,
                             reduction="none")
        w = batch.weights.flatten()
        lm_loss = (ce * w).sum() / w.sum()
    return ForwardOut(lm_loss + sparse.mask_loss_weight * mask_loss, lm_loss, mask_loss, image_keep, text_keep)
