"""Reading and writing state dicts in the layouts checkpoints use: one file or shards with an index json,
safetensors or PyTorch .bin."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dynllava.errors import CheckpointError

WEIGHT_FILES = {  # single file -> index file, in order of preference
    "model.safetensors": "model.safetensors.index.json",
    "pytorch_model.bin": "pytorch_model.bin.index.json",
}


def _load_one(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"weight file {path} is missing")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"cannot read weight file {path}: {exc}",
                              hint="the file may be truncated or corrupt; download it again") from exc


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, whatever its file layout."""
    for single, index in WEIGHT_FILES.items():
        if (directory / index).is_file():
            try:
                weight_map = json.loads((directory / index).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{directory / index} is not a valid shard index: {exc}") from exc
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                state.update(_load_one(directory / shard))
            missing = sorted(set(weight_map) - set(state))
            if missing:
                raise CheckpointError(f"shard index lists {len(missing)} tensors the shards lack: "
                                      f"{', '.join(missing[:5])}")
            return state
        if (directory / single).is_file():
            return _load_one(directory / single)
    raise CheckpointError(f"no weights found in {directory}",
                          hint="expected model.safetensors, pytorch_model.bin or a sharded index json")


def write_state_dict(state: dict[str, torch.Tensor], directory: Path, fmt: str = "safetensors",
                     shards: int = 1, metadata: dict[str, str] | None = None) -> None:
    """Write tensors as one file or `shards` files plus an index json (the Hugging Face naming)."""
    if fmt not in ("safetensors", "bin"):
        raise ValueError(f"unknown weight format {fmt!r}")
    single = "model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"
    state = {k: v.contiguous() for k, v in state.items()}

    def dump(part: dict[str, torch.Tensor], path: Path) -> None:
        if fmt == "safetensors":
            save_file(part, str(path), metadata={"format": "pt", **(metadata or {})})
        else:
            torch.save(part, path)

    if shards <= 1:
        dump(state, directory / single)
        return
    keys = list(state)
    stem, ext = single.rsplit(".", 1)
    weight_map = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = {k: state[k] for k in keys[i::shards]}
        dump(part, directory / name)
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / WEIGHT_FILES[single]).write_text(json.dumps(index, indent=2))
