"""Runs an export directory with ONNX Runtime behind the same calls as the reference model (encode_images,
prefill, decode_step, forward_no_cache), so the generation loop is shared.

Every graph and tensor name comes from dynllava.json. The KV state is a paged block pool per layer in host memory:
ONNX Runtime reads it without a copy, and the decode graph's KVCacheAppend (a ScatterND) writes the new rows in
place because past.{i}.* and present.{i}.* are bound to the same buffer with IOBinding. The CUDA execution
provider is chosen when onnxruntime-gpu sees a GPU (the pools then still live in host memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dynllava.config import keep_count
from dynllava.errors import CheckpointError, InputError
from dynllava.export.manifest import Manifest
from dynllava.flops import ModelShape
from dynllava.model.sparse_llama import IMAGE_PLACEHOLDER, PrefillOutput
from dynllava.runtime.kv_cache import PagedKVCache

DEFAULT_BLOCK_SIZE = 16


def _providers() -> list[str]:
    import onnxruntime as ort
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


@dataclass
class OrtNoCacheOutput:
    logits: torch.Tensor
    kept_image_indices: list[torch.Tensor | None]
    generated_kept: list[int]


class OnnxRuntimeModel:
    def __init__(self, path: str | Path, providers: list[str] | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
                 threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        self.manifest = Manifest.read(self.path)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.providers = providers or _providers()
        self.sessions = {}
        for name, spec in self.manifest.graphs.items():
            file = self.path / spec.file
            try:
                self.sessions[name] = ort.InferenceSession(str(file), options, providers=self.providers)
            except Exception as exc:  # ONNX Runtime raises its own types for a corrupt or truncated file
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise CheckpointError(f"cannot load graph {file}: {first}",
                                      hint="the file may be truncated or corrupt; re-export the model") from exc
        m, sparse = self.manifest.model, self.manifest.sparse_config
        self.num_layers, self.sparse_layer = m["num_layers"], sparse["sparse_layer"]
        self.kv_heads, self.head_dim, self.hidden_size = m["kv_heads"], m["head_dim"], m["hidden_size"]
        self.num_image_tokens = m["num_image_tokens"]
        self.block_size = block_size
        self.np_dtype = np.dtype(self.manifest.graphs["decode"].inputs[-1].dtype)
        self.dtype = torch.float16 if self.np_dtype == np.float16 else torch.float32
        rate = sparse["vision_keep_rate"] if sparse["use_vision_predictor"] else 1.0
        self.kept_image_tokens = keep_count(rate, self.num_image_tokens)
        self.cost_shape = ModelShape(self.path.name, self.hidden_size, self.num_layers, self.kv_heads, self.head_dim,
                                     self.num_image_tokens, self.sparse_layer, rate, sparse["output_text_keep_rate"])

    # ------------------------------------------------------------------ vision
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values [Bi, 3, H, W] -> [Bi, N, D]
        out = self.sessions["vision"].run(None, {"pixel_values": pixel_values.numpy().astype(self.np_dtype)})[0]
        return torch.from_numpy(out)

    # ------------------------------------------------------------------ prompt batches
    def _prompt_batch(self, prompts: list[list[int]], features: list[torch.Tensor | None]) -> dict[str, np.ndarray]:
        """Right-padded full-length ids, image rows and offsets. A text-only row must fit the reduced width
        S - N + k, so a mixed batch is padded by N - k; a text-only batch passes N = 0 image tokens."""
        n = self.num_image_tokens
        any_image = any(f is not None for f in features)
        rows, offsets = [], []
        for ids, feat in zip(prompts, features):
            slots = [i for i, t in enumerate(ids) if t == IMAGE_PLACEHOLDER]
            if len(slots) > 1 or (slots and feat is None) or (feat is not None and not slots):
                raise InputError("each prompt needs exactly one image placeholder per image (at most one image)")
            if slots:
                at = slots[0]
                rows.append(ids[:at] + [0] * n + ids[at + 1:])
                offsets.append(at)
            else:
                rows.append(list(ids))
                offsets.append(-1)
        lengths = [len(r) for r in rows]
        width = max(lengths)
        if any_image:
            width = max([width] + [ln + n - self.kept_image_tokens for ln, off in zip(lengths, offsets) if off < 0])
        input_ids = np.zeros((len(rows), width), dtype=np.int64)
        for b, r in enumerate(rows):
            input_ids[b, : len(r)] = r
        image_embeds = np.zeros((len(rows), n if any_image else 0, self.hidden_size), dtype=self.np_dtype)
        for b, feat in enumerate(features):
            if feat is not None:
                image_embeds[b] = feat.numpy()
        return {"input_ids": input_ids, "image_embeds": image_embeds,
                "image_offsets": np.asarray(offsets, dtype=np.int64), "lengths": np.asarray(lengths, dtype=np.int64)}

    def _kept(self, kept: np.ndarray, offsets: np.ndarray) -> list[torch.Tensor | None]:
        return [torch.from_numpy(kept[b].copy()) if offsets[b] >= 0 else None for b in range(len(offsets))]

    # ------------------------------------------------------------------ prefill / decode
    def new_cache(self, batch: int, capacity: int) -> PagedKVCache:
        blocks = batch * -(-(capacity + 1) // self.block_size) + 1  # +1 row of room per sequence, +1 scratch
        return PagedKVCache(self.num_layers, self.sparse_layer, self.kv_heads, self.head_dim, batch,
                            self.block_size, blocks, blocks, self.np_dtype)

    def check_limits(self, batch: int, tokens: int) -> None:
        """The limits the model was exported for (dynllava.json), as clear errors."""
        limits = self.manifest.limits
        if batch > limits["max_batch"]:
            raise InputError(f"batch of {batch} exceeds the export's max_batch {limits['max_batch']}",
                             hint="send fewer requests at once or re-export with a larger --max-batch")
        if tokens > limits["max_seq_len"]:
            raise InputError(f"{tokens} tokens exceed the export's max_seq_len {limits['max_seq_len']}",
                             hint="shorten the prompt, lower --max-new-tokens or re-export with --max-seq-len")

    def prefill(self, prompts: list[list[int]], features: list[torch.Tensor | None], capacity: int) -> PrefillOutput:
        self.check_limits(len(prompts), capacity)
        feeds = self._prompt_batch(prompts, features)
        outputs = self.sessions["prefill"].run(None, feeds)
        logits, kept, sparse_lengths, presents = outputs[0], outputs[1], outputs[2], outputs[3:]
        cache = self.new_cache(len(prompts), capacity)
        lengths = feeds["lengths"]
        for layer in range(self.num_layers):
            rows = lengths if layer < self.sparse_layer else sparse_lengths
            for b in range(len(prompts)):
                cache.write_rows(layer, b, presents[2 * layer][b, :, : rows[b]],
                                 presents[2 * layer + 1][b, :, : rows[b]])
        cache.dense.lengths[:] = lengths
        cache.sparse.lengths[:] = sparse_lengths
        cache.positions[:] = lengths
        n_img = [self.num_image_tokens if off >= 0 else 0 for off in feeds["image_offsets"]]
        return PrefillOutput(torch.from_numpy(logits), cache, self._kept(kept, feeds["image_offsets"]), n_img)

    def decode_step(self, token_ids: torch.Tensor, cache: PagedKVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per sequence. The new rows land in the pools in place; lengths advance by keep."""
        import onnxruntime as ort

        session = self.sessions["decode"]
        for group in (cache.dense, cache.sparse):
            for b in range(len(group.tables)):
                group.reserve(b, int(group.lengths[b]) + 1)  # the slot the new row is written to
        binding = session.io_binding()
        feeds = {"input_ids": token_ids.numpy().astype(np.int64), "positions": cache.positions,
                 "dense_lengths": cache.dense.lengths, "sparse_lengths": cache.sparse.lengths,
                 "dense_block_tables": cache.dense.table_array(), "sparse_block_tables": cache.sparse.table_array()}
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        names = self.manifest.graphs["decode"]
        past = [t.name for t in names.inputs[len(feeds):]]
        present = [t.name for t in names.outputs[4:]]
        if not hasattr(cache, "ort_values"):  # wrap the numpy pools once; ORT then reads and writes them in place
            cache.ort_values = [ort.OrtValue.ortvalue_from_numpy(p) for p in cache.pools]
        for name in names.output_names()[:4]:  # bound first: copy_outputs_to_cpu keeps binding order
            binding.bind_output(name, "cpu")
        for p_in, p_out, value in zip(past, present, cache.ort_values):
            binding.bind_ortvalue_input(p_in, value)
            binding.bind_ortvalue_output(p_out, value)
        session.run_with_iobinding(binding)
        logits, keep, dense_out, sparse_out = (v.numpy() for v in binding.get_outputs()[:4])
        cache.dense.lengths[:] = dense_out
        cache.sparse.lengths[:] = sparse_out
        cache.positions += 1
        return torch.from_numpy(logits), torch.from_numpy(keep)

    def forward_no_cache(self, input_ids: list[list[int]], features: list[torch.Tensor | None],
                         generated_from: list[int]) -> OrtNoCacheOutput:
        feeds = self._prompt_batch(input_ids, features)
        extra = [self.num_image_tokens - 1 if off >= 0 else 0 for off in feeds["image_offsets"]]
        feeds["generated_from"] = np.asarray([g + e for g, e in zip(generated_from, extra)], dtype=np.int64)
        logits, kept, generated_kept = self.sessions["nocache"].run(None, feeds)
        return OrtNoCacheOutput(torch.from_numpy(logits), self._kept(kept, feeds["image_offsets"]),
                                [int(x) for x in generated_kept])
