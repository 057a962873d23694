"""Makes docs/explain-shapes.png, the README's `--explain` figure: two one-shape scenes (`sample_scene` seeds 3 and
4), each as the model saw it and as `generate --explain` draws what it kept, side by side with 16 px white gaps.

    python docs/make_explain_shapes.py [MODEL] [OUT]   # defaults: the shipped shapes model, docs/explain-shapes.png
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from dynllava.tasks.shapes import render, sample_scene, shapes_model_dir

SEEDS = (3, 4)  # a green circle on the left, a white square in the center
GAP = 16


def panels(model: str, seed: int, work: Path) -> list[Image.Image]:
    """The scene enlarged to the overlay's size, and the overlay; prints the model's answer."""
    picture, explain = work / f"scene{seed}.png", work / f"explain{seed}"
    render(sample_scene(np.random.default_rng(seed), 96, count=1)).save(picture)
    result = subprocess.run([sys.executable, "-m", "dynllava.cli", "generate", model, "--image", str(picture),
                             "--prompt", "What color is the shape?", "--max-new-tokens", "8", "--explain",
                             str(explain), "--json"], capture_output=True, text=True, check=True)
    print(seed, json.loads(next(x for x in result.stdout.splitlines() if x.startswith("{")))["text"])
    overlay = Image.open(explain / "request-0.png").convert("RGB")
    return [Image.open(picture).convert("RGB").resize(overlay.size, Image.NEAREST), overlay]


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else str(shapes_model_dir())
    out = sys.argv[2] if len(sys.argv) > 2 else str(Path(__file__).parent / "explain-shapes.png")
    work = Path(tempfile.mkdtemp())
    images = [p for seed in SEEDS for p in panels(model, seed, work)]
    w, h = images[0].size
    figure = Image.new("RGB", (len(images) * (w + GAP) - GAP, h), (255, 255, 255))
    for i, image in enumerate(images):
        figure.paste(image, (i * (w + GAP), 0))
    figure.save(out)


if __name__ == "__main__":
    main()
