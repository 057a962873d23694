"""The model facts every executor exposes to the engine, read from an export's dynllava.json."""

from __future__ import annotations

from typing import Any

import numpy as np

from dynllava.config import keep_count
from dynllava.export.manifest import Manifest


def set_model_facts(executor: Any, manifest: Manifest) -> None:
    m, sparse = manifest.model, manifest.sparse_config
    e = executor
    e.num_layers, e.sparse_layer = m["num_layers"], sparse["sparse_layer"]
    e.kv_heads, e.head_dim, e.hidden_size = m["kv_heads"], m["head_dim"], m["hidden_size"]
    e.num_image_tokens, e.max_positions = m["num_image_tokens"], m["max_position_embeddings"]
    e.np_dtype = np.dtype(manifest.graphs["decode"].inputs[-1].dtype)
    e.vision_keep_rate = sparse["vision_keep_rate"] if sparse["use_vision_predictor"] else 1.0
    e.kept_image_tokens = keep_count(e.vision_keep_rate, e.num_image_tokens)
    e.output_text_keep_rate = sparse["output_text_keep_rate"]
    e.output_predictor_on = bool(sparse["use_text_predictor"] and sparse["use_output_text_predictor"])
    e.limits = dict(manifest.limits)
