"""The exported graphs as PyTorch modules over a DynamicLlava: tensor-only code with batch and sequence axes
dynamic, traced by the exporter. They compute what the reference model computes (checked after export):

* vision:  pixel_values [Bi, 3, H, W] -> image_embeds [Bi, N, D]
* prefill: input_ids [B, S], image_embeds [B, N, D], image_offsets [B] (-1 = none), lengths [B]
           -> logits [B, V], kept_image_indices [B, k], sparse_lengths [B], present.{i}.key/value
              (layers < l: [B, Hkv, S, Dh]; layers >= l: [B, Hkv, S', Dh], S' = S - N + k)
* nocache: prefill's inputs + generated_from [B] -> logits, kept_image_indices, generated_kept [B] (Eq. 12)
* decode:  input_ids [B], positions [B], {dense,sparse}_lengths [B], {dense,sparse}_block_tables [B, M],
           past.{i}.key/value paged pools [NB, bs, Hkv, Dh]
           -> logits [B, V], keep [B], {dense,sparse}_lengths_out [B], present.{i}.key/value (the pools, with the
              token's row written at slot lengths[b]; bind past and present to one buffer to update in place)
"""

from __future__ import annotations

import torch
from torch import nn

from dynllava.config import rate_fraction
from dynllava.export.ops import kv_cache_append_op, topk_gather_op
from dynllava.model.sparse_llama import DynamicLlava, layer_forward, self_attention_mask


def _kv_names(prefix: str, layers: range) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in layers for kind in ("key", "value")]


class VisionGraph(nn.Module):
    input_names = ["pixel_values"]
    output_names = ["image_embeds"]

    def __init__(self, model: DynamicLlava):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_images(pixel_values)


class PrefillGraph(nn.Module):
    """Prefill (with_cache=True) or one stateless Eq. 12 decoding step (with_cache=False)."""

    def __init__(self, model: DynamicLlava, with_cache: bool = True):
        super().__init__()
        self.model = model
        self.with_cache = with_cache
        sparse = model.sparse
        frac = rate_fraction(sparse.vision_keep_rate) if sparse.use_vision_predictor else rate_fraction(1.0)
        self.keep_num, self.keep_den = frac.numerator, frac.denominator
        self.input_names = ["input_ids", "image_embeds", "image_offsets", "lengths"]
        if with_cache:
            self.output_names = ["logits", "kept_image_indices", "sparse_lengths",
                                 *_kv_names("present", range(model.num_layers))]
        else:
            self.input_names.append("generated_from")
            self.output_names = ["logits", "kept_image_indices", "generated_kept"]

    def _embed(self, input_ids, image_embeds, image_offsets):
        # input_ids [B, S]; image_embeds [B, N, D]; image_offsets [B] -> h [B, S, D]
        text = self.model.language_model.embed_tokens(input_ids)
        n = image_embeds.shape[1]
        j = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        rel = j - image_offsets[:, None]
        in_img = (image_offsets[:, None] >= 0) & (rel >= 0) & (rel < n)
        # row 0 is a zero row, so text positions gather a real row even when N = 0 (a text-only batch)
        padded = torch.cat([torch.zeros_like(text[:, :1]), image_embeds], dim=1)
        index = torch.where(in_img, rel + 1, torch.zeros_like(rel))
        image = padded.gather(1, index[..., None].expand(-1, -1, padded.shape[2]))
        return torch.where(in_img[..., None], image, text)

    def _image_scores(self, h, image_offsets, lengths, n):
        # h [B, S, D] entering layer l -> scores [B, N]
        index = image_offsets.clamp(min=0)[:, None] + torch.arange(n, device=h.device)[None]  # [B, N]
        index = torch.where(index < lengths[:, None], index, torch.zeros_like(index))
        image_h = h.gather(1, index[..., None].expand(-1, -1, h.shape[2]))
        if self.model.image_score_predictor is None:
            return torch.zeros_like(image_h[..., 0])
        return self.model.image_score_predictor.keep_scores(image_h.float())  # predictors run in fp32

    def _run(self, layers, h, positions, mask, presents):
        cos, sin = self.model.language_model.rotary_emb(h, positions)
        for i in layers:
            h, k, v = layer_forward(self.model.language_model.layers[i], h, cos, sin, None, None, mask)
            presents += [k, v]
        return h

    def forward(self, input_ids, image_embeds, image_offsets, lengths, generated_from=None):
        m = self.model
        l = m.sparse_layer
        h = self._embed(input_ids, image_embeds, image_offsets)
        j = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        valid = j < lengths[:, None]
        presents: list[torch.Tensor] = []
        h = self._run(range(l), h, j.expand_as(input_ids), self_attention_mask(valid), presents)

        scores = self._image_scores(h, image_offsets, lengths, image_embeds.shape[1])
        h, positions, kept, new_lengths = topk_gather_op(scores, h, image_offsets, lengths, self.keep_num,
                                                             self.keep_den)
        j2 = torch.arange(h.shape[1], device=h.device)[None]
        valid = j2 < new_lengths[:, None]
        key_kept, generated_kept = None, None
        if not self.with_cache:
            key_kept, generated_kept = self._select_generated(h, j2, lengths, new_lengths, generated_from)
        h = self._run(range(l, m.num_layers), h, positions, self_attention_mask(valid, key_kept), presents)

        last = (new_lengths - 1)[:, None, None].expand(-1, 1, h.shape[2])
        logits = m.lm_head(m.language_model.norm(h.gather(1, last)[:, 0]))  # [B, V]
        if self.with_cache:
            return (logits, kept, new_lengths, *presents)
        return logits, kept, generated_kept

    def _select_generated(self, h, j, lengths, new_lengths, generated_from):
        """Paper Eq. 12 on the reduced sequence: which generated tokens other tokens may attend to.

        Scored = generated tokens but the newest; num_keep = batch max of #(margin > t); a scored token is
        kept iff fewer than num_keep scored tokens of its sequence rank above it by margin logit0 - logit1 (equal
        margins: the earlier token ranks above), the reference's rule. Masking the others as keys equals gathering
        the kept ones (every token still attends to itself)."""
        start = generated_from - (lengths - new_lengths)  # image tokens dropped before the generated ones
        newest = new_lengths - 1
        scored = (j >= start[:, None]) & (j < newest[:, None])  # [B, S']
        has_generated = (new_lengths > start).to(torch.long)
        predictor = self.model.output_text_score_predictor
        if predictor is None or not self.model.output_predictor_on:
            return torch.ones_like(scored), scored.sum(1) + has_generated
        logits = predictor(h.float())  # [B, S', 2]
        margin = logits[..., 0] - logits[..., 1]
        votes = (margin > self.model.output_threshold) & scored  # the threshold is a constant of the graph
        num_keep = votes.sum(1).max()
        score = torch.where(scored, margin, torch.full_like(margin, float("-inf")))
        a, b = score[:, :, None], score[:, None, :]  # rank of i = scored j ahead of i (higher, or equal and earlier)
        earlier = j[0][None, :, None] > j[0][None, None, :]
        ahead = scored[:, None, :] & ((b > a) | ((b == a) & earlier))
        kept = scored & (ahead.sum(2) < num_keep)
        return ~scored | kept, kept.sum(1) + has_generated


class DecodeGraph(nn.Module):
    """One token per sequence over paged KV pools; the append is KVCacheAppend on every layer's pools."""

    def __init__(self, model: DynamicLlava, in_place: bool = False):
        """in_place: write the new rows straight into the pools (eager execution); the traced graph instead calls
        KVCacheAppend, whose output the runtime binds to the same buffer as its pool input."""
        super().__init__()
        self.model = model
        self.in_place = in_place
        layers = range(model.num_layers)
        self.input_names = ["input_ids", "positions", "dense_lengths", "sparse_lengths", "dense_block_tables",
                            "sparse_block_tables", *_kv_names("past", layers)]
        self.output_names = ["logits", "keep", "dense_lengths_out", "sparse_lengths_out",
                             *_kv_names("present", layers)]

    def forward(self, input_ids, positions, dense_lengths, sparse_lengths, dense_block_tables,
                sparse_block_tables, *pools):
        m = self.model
        l = m.sparse_layer
        h = m.language_model.embed_tokens(input_ids)[:, None]  # [B, 1, D]
        cos, sin = m.language_model.rotary_emb(h, positions[:, None])
        keep = torch.ones_like(input_ids, dtype=torch.bool)
        presents = []
        for i, layer in enumerate(m.language_model.layers):
            if i == l and m.output_predictor_on:
                keep = m.output_text_score_predictor.keep(h[:, 0].float(), m.output_threshold)
            tables, lengths = (dense_block_tables, dense_lengths) if i < l else (sparse_block_tables, sparse_lengths)
            k_pool, v_pool = pools[2 * i], pools[2 * i + 1]
            past_k, past_v = _gather_blocks(k_pool, tables), _gather_blocks(v_pool, tables)  # [B, Hkv, T, Dh]
            valid = torch.arange(past_k.shape[2], device=h.device)[None] < lengths[:, None]
            mask = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)[:, None, None]  # [B, 1, 1, T + 1]
            h, k, v = layer_forward(layer, h, cos, sin, past_k, past_v, mask)
            append = _append_in_place if self.in_place else kv_cache_append_op
            presents += [append(k_pool, tables, lengths, k[:, :, 0]), append(v_pool, tables, lengths, v[:, :, 0])]
        logits = m.lm_head(m.language_model.norm(h[:, 0]))
        return (logits, keep, dense_lengths + 1, sparse_lengths + keep.to(sparse_lengths.dtype), *presents)


def _append_in_place(pool: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor,
                     update: torch.Tensor) -> torch.Tensor:
    # KVCacheAppend's semantics, writing into `pool` itself
    bs = pool.shape[1]
    pool[tables.gather(1, (lengths // bs)[:, None])[:, 0], lengths % bs] = update
    return pool


def _gather_blocks(pool: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    # pool [NB, bs, Hkv, Dh]; tables [B, M] -> [B, Hkv, M * bs, Dh] (reads only the listed blocks)
    blocks = pool[tables]  # [B, M, bs, Hkv, Dh]
    b, mb, bs, hkv, dh = blocks.shape
    return blocks.reshape(b, mb * bs, hkv, dh).transpose(1, 2)
