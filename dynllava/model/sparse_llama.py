"""The reference Dynamic-LLaVA model: LLaVA-1.5 plus the two predictors, in the three inference modes.

Building blocks come from transformers (CLIPVisionModel, LlavaMultiModalProjector, LlamaModel's decoder layers,
RMSNorm and rotary embedding); what is ours is the sparse control flow around them:

* prefill: layers < l on every token; at layer l the image predictor keeps floor(r * N) image tokens per image (top
  by the margin logit[0] - logit[1], equal margins -> lower index first; original order, original RoPE positions);
  layers >= l run on the reduced sequence.
* decode with KV cache: layers < l always append; at layer l the output-text predictor decides whether the token's
  K/V enter the caches of layers >= l (margin logit0 - logit1 > t; t = `output_threshold`, 0 = the trained rule,
  set per deployment by a calibration record); the token always attends to itself.
* decode without KV cache (paper Eq. 12): the whole sequence is re-run each step; among the generated tokens the
  top num_keep by margin are kept (same tie rule), num_keep = batch max of #(margin > t); the newest token is
  always kept. For the sequence with the most votes (any sequence alone) that is exactly Eq. 12's set
  {logit0 > logit1}, so a batch of one decodes as the KV-cache mode does.

Batching is exact (unlike the official code): every sequence has its own image offset, prompt length, kept set and
cache lengths, right-padded with masks, so a batch gives what each sequence gives alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionModel, LlamaModel, LlavaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, apply_rotary_pos_emb, repeat_kv
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from dynllava.config import SparseConfig
from dynllava.errors import ConfigError, InputError
from dynllava.flops import ModelShape
from dynllava.model.kv_cache import KVCache, LayerGroupCache
from dynllava.model.predictors import TextPredictor, VisionPredictor, top_k_in_order

# Stands for the image in a prompt's token ids (as in the original LLaVA code); expanded to N image embeddings.
IMAGE_PLACEHOLDER = -200


@dataclass
class PrefillOutput:
    logits: torch.Tensor  # [B, V] logits of each sequence's last prompt token
    cache: KVCache
    kept_image_indices: list[torch.Tensor | None]  # per sequence: kept image-token indices (0..N-1), ascending
    num_image_tokens: list[int]  # per sequence: N, or 0 without an image
    # per sequence: the image tokens' keep margins [N] (fp32) the selection ranked, or None; set by the reference
    # (export validation uses them to tell a near-tie from a wrong decision), None from the graph backends
    image_margins: list[torch.Tensor | None] | None = None


@dataclass
class NoCacheOutput:
    logits: torch.Tensor  # [B, V]
    kept_image_indices: list[torch.Tensor | None]
    kept_generated: list[torch.Tensor]  # per sequence: indices (0-based among generated tokens) that took part

    @property
    def generated_kept(self) -> list[int]:
        """Per sequence: generated tokens that took part (kept ones and the newest)."""
        return [len(k) for k in self.kept_generated]


def rotated_qkv(layer: LlamaDecoderLayer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer's attention inputs for h [B, S, D]: q [B, Hq, S, Dh], k and v [B, Hkv, S, Dh], q and k after RoPE."""
    attn = layer.self_attn
    b, s, _ = h.shape
    x = layer.input_layernorm(h)
    q = attn.q_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def layer_forward(layer: LlamaDecoderLayer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   past_k: torch.Tensor | None, past_v: torch.Tensor | None, mask: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One LLaMA decoder layer over explicit past K/V and an explicit mask.

    h: [B, S, D]; cos/sin: [B, S, Dh]; past_k/v: [B, Hkv, T, Dh] or None; mask: bool [B, 1, S, T + S] (True =
    attend). Returns the new h [B, S, D] and this chunk's K/V [B, Hkv, S, Dh] (after RoPE), for the cache.
    """
    attn = layer.self_attn
    b, s, _ = h.shape
    q, k, v = rotated_qkv(layer, h, cos, sin)
    keys = k if past_k is None else torch.cat([past_k, k], dim=2)  # [B, Hkv, T + S, Dh]
    values = v if past_v is None else torch.cat([past_v, v], dim=2)
    groups = attn.num_key_value_groups
    out = F.scaled_dot_product_attention(q, repeat_kv(keys, groups), repeat_kv(values, groups),
                                         attn_mask=mask, scale=attn.scaling)  # [B, Hq, S, Dh]
    h = h + attn.o_proj(out.transpose(1, 2).reshape(b, s, -1))
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return h, k, v


def self_attention_mask(valid: torch.Tensor, key_kept: torch.Tensor | None = None) -> torch.Tensor:
    """Causal mask over a right-padded chunk. valid: bool [B, S]; key_kept: optional bool [B, S], tokens others may
    attend to (Eq. 12 masks dropped generated tokens this way) -> bool [B, 1, S, S].

    Every query row may attend to itself, so padding rows never see an all-masked row (NaN in SDPA).
    """
    idx = torch.arange(valid.shape[1], device=valid.device)  # comparisons, not tril/eye: they export everywhere
    causal = idx[None, :] <= idx[:, None]
    eye = idx[None, :] == idx[:, None]
    keys = valid if key_kept is None else valid & key_kept
    return ((causal[None] & keys[:, None, :]) | eye[None])[:, None]


def _output_predictor_on(sparse: SparseConfig) -> bool:
    return sparse.use_text_predictor and sparse.use_output_text_predictor


def _pad_rows(rows: list[torch.Tensor], length: int, value: float | int = 0) -> torch.Tensor:
    """Right-pad a list of [S_b, ...] tensors into [B, length, ...]."""
    out = rows[0].new_full((len(rows), length, *rows[0].shape[1:]), value)
    for b, row in enumerate(rows):
        out[b, : row.shape[0]] = row
    return out


class DynamicLlava(nn.Module):
    """LLaVA-1.5 (CLIP tower, mlp2x_gelu projector, LLaMA) with Dynamic-LLaVA's image and output-text predictors."""

    def __init__(self, config: LlavaConfig, sparse: SparseConfig):
        """Predictors are built as the official code builds them: the image predictor iff use_vision_predictor,
        the output-text predictor iff use_text_predictor and use_output_text_predictor (a checkpoint trained
        without one has no weights for it)."""
        super().__init__()
        text = config.text_config
        self.config = config
        self.vision_tower = CLIPVisionModel(config.vision_config)
        self.mm_projector = LlavaMultiModalProjector(config)
        self.language_model = LlamaModel(text)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.image_score_predictor = (VisionPredictor(text.hidden_size, sparse.d_model, sparse.nhead,
                                                      sparse.dim_feedforward, sparse.num_layers)
                                      if sparse.use_vision_predictor else None)
        self.output_text_score_predictor = (TextPredictor(text.hidden_size, sparse.d_model)
                                            if _output_predictor_on(sparse) else None)
        # deploy-time threshold on the output-text predictor's margin (keep iff logit0 - logit1 > t); 0 = trained
        self.output_threshold = 0.0
        self.calibration = None  # the calibration record in effect (dynllava.calib.record), set by the loader
        self.configure_sparsity(sparse)

    def configure_sparsity(self, sparse: SparseConfig, output_threshold: float | None = None) -> None:
        """Switch to another sparse_config (e.g. a --vision-keep-rate override) over the same weights;
        output_threshold: a new threshold t on the output-text predictor's margin (None: keep the current one; -inf
        keeps every token, as calibration's keep-all reference does)."""
        if output_threshold is not None:
            if isinstance(output_threshold, bool) or not isinstance(output_threshold, (int, float)) \
                    or math.isnan(output_threshold):
                raise ConfigError(f"the output-text threshold must be a number, got {output_threshold!r}")
            self.output_threshold = float(output_threshold)
        layers = self.config.text_config.num_hidden_layers
        if not 0 <= sparse.sparse_layer < layers:
            raise ConfigError(f"sparse_config.sparse_layer must be in [0, {layers - 1}] for a {layers}-layer "
                              f"model, got {sparse.sparse_layer}")
        if sparse.use_instruct_predictor:
            raise ConfigError("sparse_config.use_instruct_predictor=true is not supported (the released "
                              "Dynamic-LLaVA recipe keeps it off)", hint="set it to false")
        if sparse.use_vision_predictor and self.image_score_predictor is None:
            raise ConfigError("use_vision_predictor is on but this checkpoint has no image predictor")
        if _output_predictor_on(sparse) and self.output_text_score_predictor is None:
            raise ConfigError("use_output_text_predictor is on but this checkpoint has no output-text predictor")
        self.sparse = sparse

    @property
    def output_predictor_on(self) -> bool:
        return _output_predictor_on(self.sparse)

    # ------------------------------------------------------------------ shapes
    @property
    def num_layers(self) -> int:
        return self.config.text_config.num_hidden_layers

    @property
    def sparse_layer(self) -> int:
        return self.sparse.sparse_layer

    @property
    def num_image_tokens(self) -> int:
        vc = self.config.vision_config
        return (vc.image_size // vc.patch_size) ** 2

    @property
    def kv_heads(self) -> int:
        return self.config.text_config.num_key_value_heads

    @property
    def head_dim(self) -> int:
        return self.language_model.layers[0].self_attn.head_dim

    @property
    def cost_shape(self) -> ModelShape:
        """What the paper's accounting (dynllava.flops) needs to know about this model."""
        text = self.config.text_config
        return ModelShape("model", text.hidden_size, self.num_layers, self.kv_heads, self.head_dim,
                          self.num_image_tokens, self.sparse_layer, self.sparse.vision_keep_rate,
                          self.sparse.output_text_keep_rate)

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    # ------------------------------------------------------------------ vision
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [Bi, 3, H, W] -> image embeddings [Bi, N, D]
        layer = self.config.vision_feature_layer
        out = self.vision_tower(pixel_values.to(self.dtype), output_hidden_states=True)
        feats = out.hidden_states[layer]
        if self.config.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]  # drop CLS
        return self.mm_projector(feats)

    def embed_prompt(self, input_ids: list[int], image_features: torch.Tensor | None
                     ) -> tuple[torch.Tensor, int | None]:
        """Token embeddings with the image's N embeddings spliced in at the placeholder.

        Returns embeds [L, D] and the image offset (index of the first image token) or None.
        """
        slots = [i for i, t in enumerate(input_ids) if t == IMAGE_PLACEHOLDER]
        if len(slots) > 1:
            raise InputError(f"a prompt may hold at most one image, found {len(slots)} image placeholders")
        if slots and image_features is None:
            raise InputError("the prompt has an image placeholder but no image was given")
        if not slots and image_features is not None:
            raise InputError("an image was given but the prompt has no image placeholder")
        embed = self.language_model.embed_tokens
        if not slots:
            return embed(torch.tensor(input_ids, device=self.device)), None
        at = slots[0]
        before = embed(torch.tensor(input_ids[:at], dtype=torch.long, device=self.device))
        after = embed(torch.tensor(input_ids[at + 1:], dtype=torch.long, device=self.device))
        return torch.cat([before, image_features.to(before.dtype), after]), at

    # ------------------------------------------------------------------ selection at layer l
    def _image_keep_index(self, h: torch.Tensor, offsets: list[int | None], lengths: list[int]
                          ) -> tuple[list[torch.Tensor], list[torch.Tensor | None], list[torch.Tensor | None]]:
        """Indices (into each full sequence) that survive image pruning, the kept image-token indices and the
        image tokens' margins (None without an image or without the image predictor).

        h: [B, S, D] hidden states entering layer l; offsets/lengths per sequence.
        """
        n = self.num_image_tokens
        k = self.sparse.vision_keep_count(n)
        with_image = [b for b, off in enumerate(offsets) if off is not None]
        kept_image: list[torch.Tensor | None] = [None] * len(offsets)
        margins: list[torch.Tensor | None] = [None] * len(offsets)
        if with_image:
            if self.sparse.use_vision_predictor:
                image_h = torch.stack([h[b, offsets[b]: offsets[b] + n] for b in with_image])  # [Bi, N, D]
                scores = self.image_score_predictor.keep_scores(image_h)  # [Bi, N] margins
                top = top_k_in_order(scores, k)  # [Bi, k] original order
                for row, b in enumerate(with_image):
                    margins[b] = scores[row]
            else:
                top = torch.arange(n, device=h.device).expand(len(with_image), n)
            for row, b in enumerate(with_image):
                kept_image[b] = top[row]
        keep_index = []
        for b, off in enumerate(offsets):
            full = torch.arange(lengths[b], device=h.device)
            if off is not None:
                full = torch.cat([full[:off], off + kept_image[b], full[off + n:]])
            keep_index.append(full)
        return keep_index, kept_image, margins

    # ------------------------------------------------------------------ full-sequence pass
    def _run_layers(self, layers: range, h: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
                    cache: LayerGroupCache | None) -> torch.Tensor:
        # h: [B, S, D]; positions: [B, S]; valid: bool [B, S]
        cos, sin = self.language_model.rotary_emb(h, positions)
        mask = self_attention_mask(valid)
        for i, layer_idx in enumerate(layers):
            h, k, v = layer_forward(self.language_model.layers[layer_idx], h, cos, sin, None, None, mask)
            if cache is not None:
                cache.write_prefix(i, k, v)
        return h

    def _forward_full(self, embeds: list[torch.Tensor], offsets: list[int | None],
                      generated_from: list[int] | None, cache: KVCache | None):
        """Run whole sequences. generated_from: per sequence, index in the full sequence where generated tokens
        start (no-cache decoding, Eq. 12), or None for a prefill. Fills `cache` if given."""
        lengths = [e.shape[0] for e in embeds]
        s = max(lengths)
        device = self.device
        h = _pad_rows(embeds, s)  # [B, S, D]
        valid = torch.arange(s, device=device)[None] < torch.tensor(lengths, device=device)[:, None]
        positions = torch.arange(s, device=device)[None].expand(len(embeds), s)
        l = self.sparse_layer
        h = self._run_layers(range(l), h, positions, valid, cache.dense if cache else None)

        keep_index, kept_image, margins = self._image_keep_index(h, offsets, lengths)
        kept_generated: list[torch.Tensor] = []
        if generated_from is not None:
            keep_index, kept_generated = self._select_generated(h, keep_index, generated_from, lengths)

        reduced = [len(ix) for ix in keep_index]
        s2 = max(reduced)
        index = _pad_rows(keep_index, s2)  # [B, S'] (padding points at row 0, masked below)
        h = h.gather(1, index[..., None].expand(-1, -1, h.shape[-1]))  # [B, S', D]
        positions = index  # original positions: prompt position == index in the full sequence
        valid = torch.arange(s2, device=device)[None] < torch.tensor(reduced, device=device)[:, None]
        h = self._run_layers(range(l, self.num_layers), h, positions, valid, cache.sparse if cache else None)

        last = torch.tensor(reduced, device=device) - 1
        logits = self.lm_head(self.language_model.norm(h[torch.arange(len(embeds)), last]))  # [B, V]
        if cache is not None:
            cache.dense.lengths[:] = torch.tensor(lengths)
            cache.sparse.lengths[:] = torch.tensor(reduced)
            cache.positions[:] = torch.tensor(lengths)
        return logits, kept_image, kept_generated, margins

    def _select_generated(self, h: torch.Tensor, keep_index: list[torch.Tensor], generated_from: list[int],
                          lengths: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Paper Eq. 12: among generated tokens (all but the newest), keep the top num_keep by margin
        logit0 - logit1 (equal margins -> the earlier token), where num_keep is the batch max of #(margin > t)
        (t = output_threshold, 0 = the trained #(logit0 > logit1));
        the newest generated token is always kept.

        The official code ranks by logit 0 alone, which can keep a token the predictor drops while dropping one it
        keeps, even in a batch of one; by margin, the top #(margin > 0) are exactly the tokens with margin > 0, the
        set Eq. 12 defines (a sequence with fewer votes than the batch max keeps its next-best tokens)."""
        scored = [list(range(g, n - 1)) if n - g >= 2 else [] for g, n in zip(generated_from, lengths)]
        kept: list[torch.Tensor] = []
        if self.output_predictor_on and any(scored):
            logits = [self.output_text_score_predictor(h[b, idx]) if idx else None for b, idx in enumerate(scored)]
            t = self.output_threshold
            num_keep = max(int((lg[:, 0] - lg[:, 1] > t).sum()) for lg in logits if lg is not None)
            for lg in logits:
                if lg is None:
                    kept.append(torch.zeros(0, dtype=torch.long, device=h.device))
                else:
                    kept.append(top_k_in_order(lg[:, 0] - lg[:, 1], min(num_keep, lg.shape[0])))
        else:
            kept = [torch.arange(len(idx), device=h.device) for idx in scored]
        out_index, out_kept = [], []
        for b, ix in enumerate(keep_index):
            g, n = generated_from[b], lengths[b]
            if n - g < 1:  # nothing generated yet: a plain prefill
                out_index.append(ix)
                out_kept.append(torch.zeros(0, dtype=torch.long, device=h.device))
                continue
            newest = torch.tensor([n - 1 - g], device=h.device)
            chosen = torch.cat([kept[b], newest])  # among generated, 0-based
            prefix = ix[ix < g]
            out_index.append(torch.cat([prefix, g + chosen]))
            out_kept.append(chosen)
        return out_index, out_kept

    # ------------------------------------------------------------------ public modes
    @torch.no_grad()
    def prefill(self, input_ids: list[list[int]], image_features: list[torch.Tensor | None],
                capacity: int) -> PrefillOutput:
        """Prefill a batch. image_features: per sequence [N, D] (from encode_images) or None.
        capacity: KV rows to allocate per sequence (prompt + room for decoding)."""
        embeds, offsets = zip(*(self.embed_prompt(ids, f) for ids, f in zip(input_ids, image_features)))
        lengths = [e.shape[0] for e in embeds]
        if max(lengths) > capacity:
            raise InputError(f"prompt of {max(lengths)} tokens does not fit the KV capacity {capacity}")
        cache = self.new_cache(len(embeds), capacity)
        logits, kept_image, _, margins = self._forward_full(list(embeds), list(offsets), None, cache)
        n_img = [self.num_image_tokens if off is not None else 0 for off in offsets]
        return PrefillOutput(logits, cache, kept_image, n_img, margins)

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        l, dtype, device = self.sparse_layer, self.dtype, self.device
        args = (batch, self.kv_heads, capacity, self.head_dim, dtype, device)
        return KVCache(LayerGroupCache.empty(l, *args), LayerGroupCache.empty(self.num_layers - l, *args),
                       torch.zeros(batch, dtype=torch.long, device=device))

    @torch.no_grad()
    def decode_step(self, token_ids: torch.Tensor, cache: KVCache, with_margins: bool = False):
        """One decode step with the KV cache. token_ids: [B] -> (logits [B, V], keep [B] bool), and the output
        predictor's margins [B] (fp32; None with the predictor off) when with_margins.

        Layers < l always append the token's K/V; layers >= l append them only if the output-text predictor
        keeps the token (margin > output_threshold). The token attends to the cache and itself in every layer
        either way.
        """
        h = self.language_model.embed_tokens(token_ids.to(self.device))[:, None]  # [B, 1, D]
        positions = cache.positions[:, None]  # [B, 1]
        cos, sin = self.language_model.rotary_emb(h, positions)
        l = self.sparse_layer
        keep = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
        margins = None
        for layer_idx, layer in enumerate(self.language_model.layers):
            if layer_idx == l and self.output_predictor_on:
                margins = self.output_text_score_predictor.margin(h[:, 0]).float()  # [B]
                keep = margins > self.output_threshold
            group, i = cache.group(layer_idx, l)
            past_k, past_v, past_valid = group.past(i)
            mask = torch.cat([past_valid, torch.ones_like(past_valid[:, :1])], dim=1)[:, None, None]  # [B,1,1,T+1]
            h, k, v = layer_forward(layer, h, cos, sin, past_k, past_v, mask)
            group.write_at_lengths(i, k, v)
        cache.dense.commit(torch.ones_like(keep))
        cache.sparse.commit(keep)
        cache.positions += 1
        logits = self.lm_head(self.language_model.norm(h[:, 0]))
        return (logits, keep, margins) if with_margins else (logits, keep)

    @torch.no_grad()
    def forward_no_cache(self, input_ids: list[list[int]], image_features: list[torch.Tensor | None],
                         generated_from: list[int]) -> NoCacheOutput:
        """Decode without a KV cache (stateless): each call re-runs whole sequences.

        input_ids: prompt + generated tokens per sequence; generated_from: per sequence, how many of its ids are
        prompt ids (the rest were generated).
        """
        embeds, offsets = zip(*(self.embed_prompt(ids, f) for ids, f in zip(input_ids, image_features)))
        # the image expands one placeholder into N tokens: shift the generated boundary accordingly
        starts = [g + (self.num_image_tokens - 1 if off is not None else 0)
                  for g, off in zip(generated_from, offsets)]
        logits, kept_image, kept_generated, _ = self._forward_full(list(embeds), list(offsets), starts, None)
        return NoCacheOutput(logits, kept_image, kept_generated)
