"""An independent formulation of Dynamic-LLaVA inference, for checking the model against.

It never gathers or caches: it runs the FULL sequence through transformers' own `LlamaDecoderLayer.forward`
(their attention code, not ours), with every token at its original position, and expresses sparsification the way
the paper's training does (MaskedSoftmax): in layers >= l a dropped token is removed as a KEY from everyone's
attention, while every query still attends to itself. If the model re-numbered RoPE positions, attended to a
dropped token, or mixed sequences in a batch, its logits would differ from these.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def masked_full_forward(model, embeds: torch.Tensor, key_kept: torch.Tensor, upto: int | None = None):
    """embeds: [S, D] one sequence (image already spliced in); key_kept: bool [S], which tokens layers >= l keep.

    Returns (logits [S, V], hidden states entering layer l [S, D]).
    """
    lm = model.language_model
    s = embeds.shape[0]
    h = embeds[None]
    positions = torch.arange(s)[None]
    cos, sin = lm.rotary_emb(h, positions)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    allowed_sparse = causal & (key_kept[None, :] | torch.eye(s, dtype=torch.bool))
    neg = torch.finfo(h.dtype).min

    def additive(allowed):
        return torch.zeros(s, s).masked_fill(~allowed, neg)[None, None]

    dense_mask, sparse_mask = additive(causal), additive(allowed_sparse)
    h_at_l = None
    for i, layer in enumerate(lm.layers):
        if i == model.sparse_layer:
            h_at_l = h[0].clone()
        out = layer(h, attention_mask=dense_mask if i < model.sparse_layer else sparse_mask,
                    position_ids=positions, position_embeddings=(cos, sin))
        h = out[0] if isinstance(out, tuple) else out
    return model.lm_head(lm.norm(h))[0], h_at_l
