"""Session-scoped tiny checkpoints (generated, seeded) and helpers shared by the tests."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
if not torch.cuda.is_available():
    # the Triton kernels run under Triton's interpreter on CPU; it must be on before any kernel is decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def official_dir(tmp_path_factory):
    from dynllava.model.tiny import init_tiny, write_example_image

    path = init_tiny(tmp_path_factory.mktemp("tiny") / "official", fmt="official", seed=0)
    write_example_image(path / "example.png")
    return path


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    from dynllava.model.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("tiny") / "hf", fmt="hf", seed=1)


@pytest.fixture(scope="session")
def loaded(official_dir):
    from dynllava.model.checkpoint import load_model

    return load_model(official_dir)


def _export(loaded, tmp_path_factory, target: str):
    from dynllava.config import ExportConfig
    from dynllava.export.exporter import export_model

    out = tmp_path_factory.mktemp("export") / f"tiny-{target}"
    export_model(loaded, out, ExportConfig(target=target))
    return out


@pytest.fixture(scope="session")
def export_dir(loaded, tmp_path_factory):
    """The portable graphs (target tensorrt: standard ops + our plugin ops, paged KV), run here by ONNX Runtime."""
    return _export(loaded, tmp_path_factory, "tensorrt")


@pytest.fixture(scope="session")
def fast_export_dir(loaded, tmp_path_factory):
    """The default export (target onnxruntime: built graphs with ORT's fused ops, KV in per-sequence slots)."""
    return _export(loaded, tmp_path_factory, "onnxruntime")


@pytest.fixture(scope="session")
def ort_model(export_dir):
    from dynllava.runtime.batch import OnnxRuntimeModel

    return OnnxRuntimeModel(export_dir)


def random_pixels(seed: int, size: int = 64) -> torch.Tensor:
    """Pixel values [3, H, W] as the CLIP processor would give (roughly unit scale)."""
    return torch.randn(3, size, size, generator=torch.Generator().manual_seed(seed))


def prompt_ids(tokenizer, text: str, image: bool) -> list[int]:
    from dynllava.runtime.processor import chat_prompt, tokenize_prompt

    return tokenize_prompt(tokenizer, chat_prompt([("user", text)], image))


@pytest.fixture(scope="session")
def saturated_dir(official_dir, loaded, tmp_path_factory):
    """The tiny checkpoint with an image predictor whose official score saturates (tests/saturated.py)."""
    from dynllava.runtime.processor import load_image, preprocess_image
    from tests.saturated import write_saturated_checkpoint

    example = preprocess_image(loaded.image_processor, load_image(official_dir / "example.png"),
                               loaded.image_aspect_ratio)
    images = [random_pixels(seed) for seed in range(30, 40)] + [example]
    return write_saturated_checkpoint(official_dir, tmp_path_factory.mktemp("saturated") / "ckpt", loaded.model,
                                      loaded.tokenizer, images)


@pytest.fixture(scope="session")
def saturated(saturated_dir):
    from dynllava.model.checkpoint import load_model

    return load_model(saturated_dir)


@pytest.fixture(scope="session")
def saturated_export(saturated_dir, tmp_path_factory):
    """`dynllava export` of the saturating checkpoint, with its validation: (export dir, CLI result)."""
    from typer.testing import CliRunner

    from dynllava.cli import app

    out = tmp_path_factory.mktemp("saturated-export") / "onnx"
    return out, CliRunner().invoke(app, ["export", str(saturated_dir), "-o", str(out)])
