"""Synthetic visual preference data: coloured shapes with correct / hallucinated answers.

The data mirrors the schema of `openbmb/RLAIF-V-Dataset` (`image`, `question`,
`chosen`, `rejected`, `idx`, `ds_name`, `origin_dataset`) and adds `task`
and `target` so that generations can be scored with `score_answer`.

Everything is generated from a `random.Random` seeded from the caller's seed, so the
same seed always gives the same rows and the same PNG bytes.

Text alone never reveals the right answer: examples are produced in mirrored pairs
(image A: chosen `a` / rejected `b`; image B: chosen `b` / rejected `a`), so every
answer string occurs exactly as often as `chosen` as it does as `rejected` in each split.
"""

from __future__ import annotations

import io
import random
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from vlm_orpo.assets.atomic import atomic_dir

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "DS_NAME",
    "ORIGIN_DATASET",
    "SHAPES",
    "SIZES",
    "TASKS",
    "build_synthetic_data",
    "generate_split",
    "score_answer",
    "text_corpus",
]

DS_NAME = "vlm-orpo-synthetic"
ORIGIN_DATASET = "synthetic-shapes"

# Saturated colours, far from each other and from the backgrounds.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 30),
    "green": (20, 170, 40),
    "blue": (30, 70, 230),
    "yellow": (245, 220, 20),
    "purple": (140, 40, 180),
    "orange": (250, 130, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, int] = {"small": 24, "large": 42}  # bounding-box side in pixels
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
TASKS: tuple[str, ...] = ("colour", "shape", "count", "description")

# (width, height) and weights: mostly square images.
IMAGE_SIZES: tuple[tuple[int, int], ...] = ((128, 128), (128, 96), (96, 128))
IMAGE_SIZE_WEIGHTS: tuple[float, ...] = (0.7, 0.15, 0.15)

NUMBER_WORDS = {
    "zero": 0,
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
}
_DIGIT_WORDS = {v: k for k, v in NUMBER_WORDS.items()}

# --------------------------------------------------------------------------- templates

QUESTIONS: dict[str, tuple[str, ...]] = {
    "colour_one": (
        "What colour is the shape?",
        "What is the colour of the shape?",
        "Which colour does the shape have?",
    ),
    "colour_many": (
        "What colour are the shapes?",
        "What colour are all the shapes?",
        "Which colour do the shapes have?",
    ),
    "shape_one": (
        "What shape is in the image?",
        "Which shape can you see?",
        "What kind of shape is shown?",
    ),
    "shape_many": (
        "What shape are the objects in the image?",
        "Which shape do all the objects have?",
        "What kind of shape are the objects?",
    ),
    "count": (
        "How many shapes are there?",
        "How many shapes are in the image?",
        "Count the shapes in the image.",
    ),
    "description": (
        "Describe the image briefly.",
        "Give a short description of the image.",
        "What does the image show?",
    ),
}

ANSWERS: dict[str, tuple[str, ...]] = {
    "colour_one": ("The shape is {colour}.", "It is {colour}."),
    "colour_many": ("The shapes are {colour}.", "They are all {colour}."),
    "shape_one": ("The shape is a {shape}.", "It is a {shape}."),
    "shape_many": ("The shapes are all {shape}s.", "They are {shape}s."),
    "count": ("The number of shapes is {count}.", "I count {count} in total."),
    "description": (
        "A {size} {colour} {shape} on a {background} background.",
        "The image shows a {size} {colour} {shape} on a {background} background.",
    ),
}


# --------------------------------------------------------------------------- drawing


@dataclass(frozen=True)
class _Obj:
    shape: str
    colour: str
    size: str
    x: int  # top-left of bounding box
    y: int


def _layout(rng: random.Random, width: int, height: int, sizes: list[str]) -> list[tuple[int, int]]:
    """Non-overlapping top-left positions, one per bounding-box size.

    Shapes are placed in distinct cells of a grid (1x1, 1x2/2x1 or 2x2) with random jitter
    inside each cell, so they never overlap and never touch the border.
    """
    n = len(sizes)
    if n == 1:
        cols, rows = 1, 1
    elif n == 2:
        cols, rows = (2, 1) if width >= height else (1, 2)
    else:
        cols, rows = 2, 2
    cw, ch = width // cols, height // rows
    cells = [(c, r) for r in range(rows) for c in range(cols)]
    rng.shuffle(cells)
    out = []
    margin = 2
    for (c, r), size in zip(cells, sizes):
        side = SIZES[size]
        assert side + 2 * margin <= min(cw, ch), (width, height, size)
        x0 = c * cw + margin + rng.randint(0, cw - side - 2 * margin)
        y0 = r * ch + margin + rng.randint(0, ch - side - 2 * margin)
        out.append((x0, y0))
    return out


def _draw(width: int, height: int, background: str, objs: list[_Obj]) -> Image.Image:
    img = Image.new("RGB", (width, height), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    for o in objs:
        side = SIZES[o.size]
        box = (o.x, o.y, o.x + side - 1, o.y + side - 1)
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "square":
            draw.rectangle(box, fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(o.x + side / 2, o.y), (o.x, o.y + side - 1), (o.x + side - 1, o.y + side - 1)], fill=fill)
        else:  # pragma: no cover - guarded by SHAPES
            raise ValueError(o.shape)
    return img


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _make_image(
    rng: random.Random,
    *,
    n: int,
    colours: list[str] | None = None,
    shapes: list[str] | None = None,
    sizes: list[str] | None = None,
    background: str | None = None,
) -> tuple[bytes, str]:
    """Draw `n` shapes; unspecified attributes are random. Returns (png, background)."""
    width, height = rng.choices(IMAGE_SIZES, weights=IMAGE_SIZE_WEIGHTS)[0]
    colours = colours or [rng.choice(list(COLOURS)) for _ in range(n)]
    shapes = shapes or [rng.choice(SHAPES) for _ in range(n)]
    sizes = sizes or [rng.choice(list(SIZES)) for _ in range(n)]
    background = background or rng.choice(list(BACKGROUNDS))
    positions = _layout(rng, width, height, sizes)
    objs = [_Obj(s, c, z, x, y) for s, c, z, (x, y) in zip(shapes, colours, sizes, positions)]
    return _png_bytes(_draw(width, height, background, objs)), background


# --------------------------------------------------------------------------- pairs


def _count_text(n: int, as_word: bool) -> str:
    return _DIGIT_WORDS[n] if as_word else str(n)


def _make_pair(rng: random.Random, task: str) -> list[dict]:
    """Two mirrored examples of `task`: chosen/rejected answer strings are swapped."""
    rows: list[dict] = []
    if task in ("colour", "shape"):
        n = 1 if rng.random() < 0.6 else rng.randint(2, 3)
        key = f"{task}_one" if n == 1 else f"{task}_many"
        a, b = rng.sample(list(COLOURS) if task == "colour" else SHAPES, 2)
        tmpl = rng.choice(ANSWERS[key])
        ans = {v: tmpl.format(**{task: v}) for v in (a, b)}
        for right, wrong in ((a, b), (b, a)):
            png, _ = _make_image(rng, n=n, **{f"{task}s": [right] * n})
            rows.append(dict(png=png, q=rng.choice(QUESTIONS[key]), chosen=ans[right], rejected=ans[wrong], target=right))
    elif task == "count":
        a, b = rng.sample(range(1, 5), 2)
        tmpl = rng.choice(ANSWERS["count"])
        as_word = rng.random() < 0.5
        ans = {k: tmpl.format(count=_count_text(k, as_word)) for k in (a, b)}
        for right, wrong in ((a, b), (b, a)):
            png, _ = _make_image(rng, n=right)
            rows.append(
                dict(png=png, q=rng.choice(QUESTIONS["count"]), chosen=ans[right], rejected=ans[wrong], target=str(right))
            )
    elif task == "description":
        # Single shape; the two images share size and background, and differ in exactly
        # one of colour / shape, which is the attribute the rejected answer hallucinates.
        size = rng.choice(list(SIZES))
        background = rng.choice(list(BACKGROUNDS))
        tmpl = rng.choice(ANSWERS["description"])
        colour = rng.choice(list(COLOURS))
        shape = rng.choice(SHAPES)
        if rng.random() < 0.5:
            other = rng.choice([c for c in COLOURS if c != colour])
            variants = [(colour, shape), (other, shape)]
        else:
            other = rng.choice([s for s in SHAPES if s != shape])
            variants = [(colour, shape), (colour, other)]
        ans = {v: tmpl.format(size=size, colour=v[0], shape=v[1], background=background) for v in variants}
        for right, wrong in ((variants[0], variants[1]), (variants[1], variants[0])):
            png, _ = _make_image(
                rng, n=1, colours=[right[0]], shapes=[right[1]], sizes=[size], background=background
            )
            rows.append(
                dict(
                    png=png,
                    q=rng.choice(QUESTIONS["description"]),
                    chosen=ans[right],
                    rejected=ans[wrong],
                    target=f"{size} {right[0]} {right[1]} on {background}",
                )
            )
    else:
        raise ValueError(f"unknown task {task!r}")
    for r in rows:
        r["task"] = task
    return rows


def generate_split(n: int, seed: int, split: str, idx_offset: int = 0) -> dict[str, list]:
    """Generate `n` rows (`n` must be even) as a dict of columns.

    `image` values are `{"bytes": PNG, "path": None}` dicts (the `datasets.Image` storage).
    """
    if n < 0 or n % 2:
        raise ValueError(f"split size must be a non-negative even number (mirrored pairs), got {n}")
    rng = random.Random(f"vlm-orpo-synthetic/{seed}/{split}")
    n_pairs = n // 2
    tasks = [TASKS[i % len(TASKS)] for i in range(n_pairs)]
    rng.shuffle(tasks)
    rows: list[dict] = []
    for task in tasks:
        pair = _make_pair(rng, task)
        if rng.random() < 0.5:  # do not always put the "a" image first
            pair.reverse()
        rows.extend(pair)
    cols: dict[str, list] = {
        k: []
        for k in ("image", "question", "chosen", "rejected", "idx", "ds_name", "origin_dataset", "task", "target")
    }
    for i, r in enumerate(rows):
        cols["image"].append({"bytes": r["png"], "path": None})
        cols["question"].append(r["q"])
        cols["chosen"].append(r["chosen"])
        cols["rejected"].append(r["rejected"])
        cols["idx"].append(idx_offset + i)
        cols["ds_name"].append(DS_NAME)
        cols["origin_dataset"].append(ORIGIN_DATASET)
        cols["task"].append(r["task"])
        cols["target"].append(r["target"])
    return cols


def _features():
    import datasets

    return datasets.Features(
        {
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "chosen": datasets.Value("string"),
            "rejected": datasets.Value("string"),
            "idx": datasets.Value("int64"),
            "ds_name": datasets.Value("string"),
            "origin_dataset": datasets.Value("string"),
            "task": datasets.Value("string"),
            "target": datasets.Value("string"),
        }
    )


def build_synthetic_data(
    out_dir: Path, n_train: int = 1000, n_validation: int = 200, seed: int = 0
) -> dict[str, Path]:
    """Write `train.parquet` and `validation.parquet` into `out_dir` (atomically).

    Returns `{"train": path, "validation": path}`. An existing `out_dir` is replaced.
    """
    import datasets

    out_dir = Path(out_dir).absolute()
    with atomic_dir(out_dir) as tmp:
        offset = 0
        for split, n in (("train", n_train), ("validation", n_validation)):
            cols = generate_split(n, seed, split, idx_offset=offset)
            offset += n
            ds = datasets.Dataset.from_dict(cols, features=_features(), split=split)
            ds.to_parquet(str(tmp / f"{split}.parquet"))
    return {"train": out_dir / "train.parquet", "validation": out_dir / "validation.parquet"}


# --------------------------------------------------------------------------- scoring

_COLOUR_RE = re.compile(r"\b(" + "|".join(COLOURS) + r")\b")
_SHAPE_RE = re.compile(r"\b(" + "|".join(SHAPES) + r")s?\b")
_COUNT_RE = re.compile(r"\b(\d+|" + "|".join(NUMBER_WORDS) + r")\b")


def _found(regex: re.Pattern, text: str) -> set[str]:
    return {m.group(1) for m in regex.finditer(text.lower())}


def _found_counts(text: str) -> set[int]:
    out = set()
    for tok in _found(_COUNT_RE, text):
        out.add(int(tok) if tok.isdigit() else NUMBER_WORDS[tok])
    return out


def score_answer(task: str, target: str, text: str) -> bool:
    """True if `text` names the right attribute and no wrong attribute of the same kind.

    * `colour`: exactly the target colour among the colour words;
    * `shape`: exactly the target shape among circle/square/triangle (plural allowed);
    * `count`: exactly the target number among digits and number words (one, two, ...);
    * `description`: target is `"<size> <colour> <shape> on <background>"`; colour and
      shape must both be right (as above).
    """
    if task == "colour":
        return _found(_COLOUR_RE, text) == {target.lower()}
    if task == "shape":
        return _found(_SHAPE_RE, text) == {target.lower()}
    if task == "count":
        return _found_counts(text) == {int(target)}
    if task == "description":
        parts = target.lower().split()
        if len(parts) < 3:
            raise ValueError(f"bad description target {target!r}")
        _, colour, shape = parts[:3]
        return _found(_COLOUR_RE, text) == {colour} and _found(_SHAPE_RE, text) == {shape}
    raise ValueError(f"unknown task {task!r}")


# --------------------------------------------------------------------------- tokenizer corpus


def text_corpus() -> list[str]:
    """Every question and every answer template filled with every attribute word.

    Used to train the tiny model's tokenizer so the dataset's text tokenizes compactly.
    """
    lines: list[str] = []
    for qs in QUESTIONS.values():
        lines.extend(qs)
    for c in COLOURS:
        lines.extend(t.format(colour=c) for t in ANSWERS["colour_one"] + ANSWERS["colour_many"])
    for s in SHAPES:
        lines.extend(t.format(shape=s) for t in ANSWERS["shape_one"] + ANSWERS["shape_many"])
    for k in range(1, 5):
        for as_word in (False, True):
            lines.extend(t.format(count=_count_text(k, as_word)) for t in ANSWERS["count"])
    for t in ANSWERS["description"]:
        for z in SIZES:
            for c in COLOURS:
                for s in SHAPES:
                    for bg in BACKGROUNDS:
                        lines.append(t.format(size=z, colour=c, shape=s, background=bg))
    return lines
