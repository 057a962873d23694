"""Synthetic tasks with known answers, to train and measure tiny Dynamic-LLaVA models (see `shapes`)."""

from dynllava.tasks.shapes import (
    QUESTION_KINDS,
    Example,
    Scene,
    Shape,
    heldout_split,
    is_correct,
    render,
    sample_example,
    sample_scene,
    shape_patch_mask,
    shapes_model_dir,
)

__all__ = ["QUESTION_KINDS", "Example", "Scene", "Shape", "heldout_split", "is_correct", "render", "sample_example",
           "sample_scene", "shape_patch_mask", "shapes_model_dir"]
