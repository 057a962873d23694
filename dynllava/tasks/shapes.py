"""The synthetic visual-question task: one or two filled shapes on a grey background, four kinds of question.

Everything is generated from a seed (numpy's PCG64), so the training stream and the held-out split are the same on
every machine:

* image: `image_size` x `image_size` RGB, a plain grey background (a random level from dark to mid grey), one or
  two filled shapes (circle, square, triangle) in distinct colours; each shape's box side is 20-40% of the image
  side and its centre lies in one of five regions (left, right, top, bottom, center), at most one shape per region,
  boxes never touching.
* questions in LLaVA-1.5's chat template (the caller renders them), answers short sentences that contain the one
  word that matters: a colour, a shape, a position or a count. `is_correct` checks that word (exact words, no
  substring matching; naming a second colour in a colour answer is wrong).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230), "yellow": (235, 220, 50),
    "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (245, 245, 245),
}
KINDS = ("circle", "square", "triangle")
REGIONS = ("left", "right", "top", "bottom", "center")
QUESTION_KINDS = ("color", "shape", "position", "count")
COUNTS = {1: "one", 2: "two"}
# the words is_correct looks for, per question kind
ANSWER_WORDS: dict[str, frozenset[str]] = {
    "color": frozenset(COLORS), "shape": frozenset(KINDS), "position": frozenset(REGIONS),
    "count": frozenset(COUNTS.values()),
}
REGION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                 "center": "in the center"}
# where a shape's centre may lie, per region, as fractions of the image side: (x0, x1, y0, y1); a box of up to 40%
# of the side around any of these centres stays inside the image
REGION_ZONES: dict[str, tuple[float, float, float, float]] = {
    "left": (0.20, 0.30, 0.38, 0.62), "right": (0.70, 0.80, 0.38, 0.62),
    "top": (0.38, 0.62, 0.20, 0.30), "bottom": (0.38, 0.62, 0.70, 0.80),
    "center": (0.42, 0.58, 0.42, 0.58),
}
SIZE_RANGE = (0.20, 0.40)  # box side / image side
BACKGROUND_RANGE = (40, 140)  # grey level, dark to mid grey
HELDOUT_SEED = 20_241_203  # the held-out split's seed; training streams use other seeds (see dynllava.training)
HELDOUT_SIZE = 400
TWO_SHAPES = 0.6  # share of two-shape scenes in position and count questions


@dataclass(frozen=True)
class Shape:
    kind: str  # circle | square | triangle
    color: str  # a key of COLORS
    center: tuple[float, float]  # (x, y) in pixels
    size: float  # side of the bounding box, pixels
    region: str  # left | right | top | bottom | center

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1), inclusive pixel coordinates as PIL draws them."""
        x, y = self.center
        h = self.size / 2
        return (x - h, y - h, x + h, y + h)


@dataclass(frozen=True)
class Scene:
    image_size: int
    background: int  # grey level of the background
    shapes: tuple[Shape, ...]


@dataclass(frozen=True)
class Example:
    image: Image.Image = field(repr=False)
    question: str
    answer: str
    kind: str  # color | shape | position | count
    scene: Scene

    @property
    def answer_word(self) -> str:
        """The word a correct answer must contain."""
        return _answer_word(self.kind, self.scene, self.question)


# ---------------------------------------------------------------------- drawing
def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, fill) -> None:
    x0, y0, x1, y1 = shape.box
    if shape.kind == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape.kind == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    else:  # triangle, apex up
        draw.polygon([(shape.center[0], y0), (x1, y1), (x0, y1)], fill=fill)


def render(scene: Scene) -> Image.Image:
    n = scene.image_size
    image = Image.new("RGB", (n, n), (scene.background,) * 3)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        _draw_shape(draw, shape, COLORS[shape.color])
    return image


def shape_pixel_mask(scene: Scene, image_size: int | None = None) -> np.ndarray:
    """bool [H, W]: the pixels any shape covers (drawn exactly as `render` draws them)."""
    n = image_size or scene.image_size
    scale = n / scene.image_size
    mask = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(mask)
    for shape in scene.shapes:
        scaled = Shape(shape.kind, shape.color, (shape.center[0] * scale, shape.center[1] * scale),
                       shape.size * scale, shape.region)
        _draw_shape(draw, scaled, 255)
    return np.asarray(mask) > 0


def shape_patch_mask(scene: Scene, image_size: int, grid: int) -> np.ndarray:
    """bool [grid * grid], row-major like the vision tower's patch tokens: which patches hold a pixel of a shape.

    image_size: the side the model sees (the scene is scaled to it); grid: patches per side."""
    if image_size % grid:
        raise ValueError(f"image_size {image_size} is not a multiple of grid {grid}")
    p = image_size // grid
    pixels = shape_pixel_mask(scene, image_size)  # [H, W]
    return pixels.reshape(grid, p, grid, p).any(axis=(1, 3)).reshape(-1)


# ---------------------------------------------------------------------- sampling
def _sample_shape(rng: np.random.Generator, n: int, region: str, color: str) -> Shape:
    x0, x1, y0, y1 = REGION_ZONES[region]
    size = rng.uniform(*SIZE_RANGE) * n
    center = (rng.uniform(x0, x1) * n, rng.uniform(y0, y1) * n)
    return Shape(str(rng.choice(KINDS)), color, center, size, region)


def _apart(a: Shape, b: Shape, gap: float = 2.0) -> bool:
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return ax1 + gap < bx0 or bx1 + gap < ax0 or ay1 + gap < by0 or by1 + gap < ay0


def sample_scene(rng: np.random.Generator, image_size: int, count: int | None = None) -> Scene:
    count = count or int(rng.integers(1, 3))
    background = int(rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1] + 1))
    while True:  # rejection sampling: two shapes never touch (a few tries at most)
        regions = rng.choice(REGIONS, size=count, replace=False)
        colors = rng.choice(list(COLORS), size=count, replace=False)
        shapes = tuple(_sample_shape(rng, image_size, str(r), str(c)) for r, c in zip(regions, colors))
        if count == 1 or _apart(*shapes):
            return Scene(image_size, background, shapes)


def _ask(rng: np.random.Generator, kind: str, scene: Scene) -> tuple[str, str]:
    """(question, answer) of one kind about a scene (colour and shape questions only for one-shape scenes)."""
    shapes = scene.shapes
    target = shapes[int(rng.integers(len(shapes)))]
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    if kind in ("color", "shape") and len(shapes) != 1:
        raise ValueError(f"{kind} questions are asked about one-shape scenes")
    if kind == "color":
        return pick(["What color is the shape?", "Which color does the shape have?"]), \
            f"The shape is {target.color}."
    if kind == "shape":
        return pick(["What shape is it?", "Which shape is shown?"]), f"It is a {target.kind}."
    if kind == "position":
        return f"Where is the {target.color} shape?", f"The {target.color} shape is {REGION_PHRASE[target.region]}."
    if kind == "count":
        question = pick(["How many shapes are there?", "How many shapes do you see?"])
        return question, ("There is one shape." if len(shapes) == 1 else "There are two shapes.")
    raise ValueError(f"unknown question kind {kind!r}; choose one of {', '.join(QUESTION_KINDS)}")


def sample_example(rng: np.random.Generator, image_size: int, kind: str | None = None,
                   two_shapes: float = TWO_SHAPES) -> Example:
    """One random example; `kind` fixes the question kind (default: uniform over QUESTION_KINDS). Colour and shape
    questions ("What color is the shape?", "What shape is it?") are about one-shape scenes; position and count
    questions about one or two shapes (two with probability `two_shapes`; the held-out split uses TWO_SHAPES)."""
    kind = kind or QUESTION_KINDS[int(rng.integers(len(QUESTION_KINDS)))]
    count = 1 if kind in ("color", "shape") else 1 + int(rng.random() < two_shapes)
    scene = sample_scene(rng, image_size, count)
    question, answer = _ask(rng, kind, scene)
    return Example(render(scene), question, answer, kind, scene)


def heldout_split(image_size: int = 64, size: int = HELDOUT_SIZE, seed: int = HELDOUT_SEED) -> list[Example]:
    """The fixed held-out split: `size` examples, the four question kinds in turn (balanced), from `seed`."""
    rng = np.random.default_rng(seed)
    return [sample_example(rng, image_size, QUESTION_KINDS[i % len(QUESTION_KINDS)]) for i in range(size)]


def task_corpus(rng: np.random.Generator, image_size: int = 64, n: int = 2000) -> list[str]:
    """Questions and answers, to train the tokenizer on (every word of the task appears)."""
    texts = [f"{c} {k} {REGION_PHRASE[r]} one two" for c in COLORS for k in KINDS for r in REGIONS]
    for i in range(n):
        ex = sample_example(rng, image_size, QUESTION_KINDS[i % len(QUESTION_KINDS)])
        texts.append(f"USER: <image>\n{ex.question} ASSISTANT: {ex.answer}</s>")
    return texts


# ---------------------------------------------------------------------- scoring
_WORD = re.compile(r"[a-z]+")


def _answer_word(kind: str, scene: Scene, question: str) -> str:
    if kind == "count":
        return COUNTS[len(scene.shapes)]
    target = scene.shapes[0]
    if kind == "position":  # the question names the shape by its colour
        words = set(_WORD.findall(question.lower()))
        target = next((s for s in scene.shapes if s.color in words), target)
    return {"color": target.color, "shape": target.kind, "position": target.region}[kind]


def is_correct(example: Example, answer_text: str) -> bool:
    """Exact-word check: of the words of the question's kind (colours, shapes, positions or counts), the answer
    contains the right one and no other."""
    found = {w for w in _WORD.findall(answer_text.lower()) if w in ANSWER_WORDS[example.kind]}
    return found == {example.answer_word}


# ---------------------------------------------------------------------- shipped model
def shapes_model_dir() -> Path:
    """The trained checkpoint shipped with the package (official Dynamic-LLaVA layout)."""
    return Path(__file__).resolve().parent.parent / "assets" / "shapes-tiny"
