"""CLEVR-like counting scenes, drawn offline with PIL/numpy, with gold step-by-step solutions.

Everything is a pure function of ``(seed, condition, index)``: scene ``index`` is drawn from its own
``random.Random`` keyed on those three values, so the first 100 scenes of a 1000-scene set equal a
100-scene set, and the files written for a seed are byte-identical from run to run (given the same
numpy, Pillow and zlib versions; the shading avoids BLAS, whose rounding varies by CPU).

Objects: 3 shapes (cube, sphere, cylinder), the 8 CLEVR colours (RGB values from CLEVR's
``properties.json``), 2 sizes and 2 materials (rubber is matte, metal has a specular highlight and
stronger contrast), on a plain gray ground, never overlapping (bounding boxes keep a margin).

CLEVR-CoGenT conditions restrict which colours cubes and cylinders may take (spheres take any):
condition ``A``: cubes gray/blue/brown/yellow, cylinders red/green/purple/cyan; condition ``B``: the
opposite; ``all``: no restriction. Training on A and testing on B is a zero-shot compositional shift.

Questions (task ``count``, integer answers):

* ``count_all``: "How many different items are there in the image?" (the R1-V / Super-CLEVR protocol
  question);
* ``count_attr``: count by one attribute ("How many red objects are there?", "How many cubes are
  there?", "How many metal objects are there?");
* ``compare``: "How many more cubes than spheres are there?", the two sides ordered so that the
  answer (a difference of counts) is never negative. Kept integer so that one grader (integer match)
  serves every CLEVR question.

Multi-step questions, where an intermediate count is needed before the answer can be written:

* ``count_two_attr``: a filter chain, "How many large red objects are there?" or "How many metal cubes
  are there?": count the red objects (the cubes), then keep the large (metal) ones among them;
* ``add``: "How many red objects and blue objects are there in total?": two counts over values of one
  attribute (so the two sets never overlap), then their sum;
* ``subtract``: "How many objects are not cubes?": count everything, count the cubes, subtract.

``QUESTION_MIXES`` names two mixes: ``counting`` (the default: count_all / count_attr / count_two_attr /
compare) and ``multistep`` (all six types, equally often).

Gold steps (``Sample.gold_steps``) are plain step texts without the ``### Step i:`` header (that is
added by :func:`vlm_mig.prompts.format_solution`); each lists the objects it counts, left to right,
and the last one states the result, e.g. ``["I see 2 cubes: a large red cube and a small gray cube.",
"I see 1 sphere: a small blue sphere.", "In total 2 + 1 = 3 objects."]``.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vlm_mig.data.schema import DataError, Sample

SHAPES = ("cube", "sphere", "cylinder")
#: RGB values of CLEVR's ``properties.json``.
COLORS: dict[str, tuple[int, int, int]] = {
    "gray": (87, 87, 87),
    "red": (173, 35, 35),
    "blue": (42, 75, 215),
    "green": (29, 105, 20),
    "brown": (129, 74, 25),
    "purple": (129, 38, 192),
    "cyan": (41, 208, 208),
    "yellow": (255, 238, 51),
}
SIZES = ("small", "large")
MATERIALS = ("rubber", "metal")
ATTRIBUTES = ("size", "color", "material", "shape")  # also the word order of a noun phrase

_COGENT_A = {
    "cube": ("gray", "blue", "brown", "yellow"),
    "cylinder": ("red", "green", "purple", "cyan"),
    "sphere": tuple(COLORS),
}
#: Allowed colours per shape for each condition.
CONDITIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "A": _COGENT_A,
    "B": {"cube": _COGENT_A["cylinder"], "cylinder": _COGENT_A["cube"], "sphere": tuple(COLORS)},
    "all": {shape: tuple(COLORS) for shape in SHAPES},
}

#: Default question-type mix (relative weights).
QUESTION_MIX = {"count_all": 0.5, "count_attr": 0.2, "count_two_attr": 0.15, "compare": 0.15}
#: Every question type, equally often: four of the six need an intermediate count before the answer (filter
#: chains, add, subtract, compare), and count_all sums per-shape counts.
MULTISTEP_MIX = {"count_all": 1.0, "count_attr": 1.0, "count_two_attr": 1.0, "compare": 1.0, "add": 1.0,
                 "subtract": 1.0}
QUESTION_MIXES = {"counting": QUESTION_MIX, "multistep": MULTISTEP_MIX}

# The generator's defaults, each written once: ``vlm-mig data clevr``, ``DataConfig`` (``data.synthetic_*``,
# ``data.max_objects``) and ``load_source("synthetic:clevr")`` read them from here.
IMAGE_SIZE = 112  #: image side in pixels (the tiny model's: 8 x 8 patches of 14 px, 16 tokens after the 2x2 merge)
NUM_OBJECTS = (1, 6)  #: objects per scene, an inclusive range
DEFAULT_CONDITION = "A"  #: CLEVR-CoGenT condition of the colour/shape rule (a key of ``CONDITIONS``)
DEFAULT_MIX = "counting"  #: question mix (a key of ``QUESTION_MIXES``)
QUESTION_TYPES = tuple(MULTISTEP_MIX)
COUNT_ALL_QUESTION = "How many different items are there in the image?"

#: Object extent (side of its square bounding box) as a fraction of the image side. Large is ~1.7x
#: small so the two sizes stay apart at 112 px (25 vs 15 px).
EXTENT = {"small": 0.13, "large": 0.22}
GAP = 0.03  # free space kept between two bounding boxes, fraction of the image side
BORDER = 0.02  # free space kept to the image edge
GROUND = (150, 150, 148)

# Light from the upper left, in front of the scene; image axes: x right, y down, z toward the viewer.
_LIGHT = np.array([-0.45, -0.6, 0.66]) / np.linalg.norm([-0.45, -0.6, 0.66])
_HALF = (_LIGHT + [0, 0, 1]) / np.linalg.norm(_LIGHT + [0, 0, 1])  # Blinn-Phong half vector


@dataclass(frozen=True)
class SceneObject:
    """One object: its attributes, its centre ``(x, y)`` in pixels and its extent (box side) in pixels."""

    shape: str
    color: str
    size: str
    material: str
    x: float
    y: float
    extent: float

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)`` in pixels; every shape is drawn inside it."""
        h = self.extent / 2
        return (round(self.x - h, 2), round(self.y - h, 2), round(self.x + h, 2), round(self.y + h, 2))

    def to_json(self) -> dict[str, Any]:
        """The Super-CLEVR object record (``pixel_coords`` is the centre ``[x, y]``)."""
        return {
            "shape": self.shape,
            "color": self.color,
            "size": self.size,
            "material": self.material,
            "pixel_coords": [self.x, self.y],
            "bbox": list(self.bbox),
            "extent": self.extent,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SceneObject:
        x, y = d["pixel_coords"][:2]
        return cls(d["shape"], d["color"], d["size"], d["material"], float(x), float(y), float(d["extent"]))


@dataclass(frozen=True)
class Scene:
    """A scene: its objects (in drawing order) and the image side in pixels."""

    objects: tuple[SceneObject, ...]
    image_size: int
    condition: str

    def to_json(self, image_filename: str, index: int = 0) -> dict[str, Any]:
        """The Super-CLEVR scene record."""
        return {
            "image_index": index,
            "image_filename": image_filename,
            "image_size": [self.image_size, self.image_size],
            "condition": self.condition,
            "objects": [o.to_json() for o in self.objects],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Scene:
        objs = tuple(SceneObject.from_json(o) for o in d["objects"])
        return cls(objs, int(d["image_size"][0]), str(d.get("condition", "all")))


@dataclass(frozen=True)
class Question:
    """A question about a scene with its integer answer and gold steps; ``spec`` says what is counted."""

    kind: str
    text: str
    answer: int
    steps: tuple[str, ...]
    spec: dict[str, Any]


@dataclass
class ClevrExample:
    """One generated scene with its rendered image and its question samples."""

    scene: Scene
    image: Image.Image
    samples: list[Sample]
    scene_json: dict[str, Any]


# ----------------------------------------------------------------------------------------- scenes


def _count_range(num_objects: int | tuple[int, int]) -> tuple[int, int]:
    lo, hi = (num_objects, num_objects) if isinstance(num_objects, int) else tuple(num_objects)
    if not 1 <= lo <= hi:
        raise DataError(
            f"num_objects must be a count >= 1 or a range (lo, hi) with 1 <= lo <= hi, got {num_objects!r}"
        )
    return int(lo), int(hi)


def _check_condition(condition: str) -> dict[str, tuple[str, ...]]:
    if condition not in CONDITIONS:
        raise DataError(f"unknown condition {condition!r}; expected one of {tuple(CONDITIONS)}")
    return CONDITIONS[condition]


def _boxes_clash(a: SceneObject, b: SceneObject, gap: float) -> bool:
    """Whether two objects' bounding boxes, each grown by ``gap / 2``, intersect."""
    reach = (a.extent + b.extent) / 2 + gap
    return abs(a.x - b.x) < reach and abs(a.y - b.y) < reach


def sample_scene(
    rng: random.Random,
    condition: str = DEFAULT_CONDITION,
    num_objects: int | tuple[int, int] = NUM_OBJECTS,
    image_size: int = IMAGE_SIZE,
) -> Scene:
    """Draw object attributes under ``condition`` and place them without overlap.

    Placement is rejection sampling, restarted as a whole when an object finds no room; a scene that
    cannot be placed in 100 restarts (too many objects for the image) raises :class:`DataError`.
    """
    palette = _check_condition(condition)
    lo, hi = _count_range(num_objects)
    n = rng.randint(lo, hi)
    attrs = []
    for _ in range(n):
        shape = rng.choice(SHAPES)
        attrs.append((shape, rng.choice(palette[shape]), rng.choice(SIZES), rng.choice(MATERIALS)))
    gap, border = GAP * image_size, BORDER * image_size
    for _restart in range(100):
        placed: list[SceneObject] = []
        for shape, color, size, material in attrs:
            extent = round(EXTENT[size] * image_size, 2)
            lo_c, hi_c = border + extent / 2, image_size - border - extent / 2
            for _try in range(200):
                x, y = round(rng.uniform(lo_c, hi_c), 2), round(rng.uniform(lo_c, hi_c), 2)
                obj = SceneObject(shape, color, size, material, x, y, extent)
                if not any(_boxes_clash(obj, other, gap) for other in placed):
                    placed.append(obj)
                    break
            else:
                break  # no room for this object: restart the layout
        else:
            return Scene(tuple(placed), image_size, condition)
    raise DataError(
        f"could not place {n} objects without overlap in a {image_size}px image; use fewer objects"
    )


# -------------------------------------------------------------------------------------- rendering


def _supersample(image_size: int) -> int:
    """Drawing scale: shapes are drawn at k times the size and box-filtered down (anti-aliasing)."""
    return max(2, min(4, 512 // image_size))


def _window(canvas: np.ndarray, box: tuple[float, float, float, float]):
    """The canvas slice covering ``box`` and the pixel-centre coordinate grids ``X, Y`` over it."""
    h, w = canvas.shape[:2]
    x0, y0 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    x1, y1 = min(w, math.ceil(box[2])), min(h, math.ceil(box[3]))
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    return canvas[y0:y1, x0:x1], xs, ys, (x0, y0)


def _shade(base: np.ndarray, normals: np.ndarray, metal: bool) -> np.ndarray:
    """uint8 colours for unit ``normals`` (N, 3): Lambert diffuse, plus a sharp specular term for metal."""
    diffuse = np.clip(_dot(normals, _LIGHT), 0.0, 1.0)[:, None]
    if not metal:
        rgb = base * (0.35 + 0.8 * diffuse)
    else:
        spec = np.clip(_dot(normals, _HALF), 0.0, 1.0)[:, None] ** 40
        # Metal: darker body with more contrast and a near-white highlight, so it reads as shiny.
        rgb = base * (0.18 + 0.9 * diffuse) + 235.0 * spec
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _dot(v: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Row-wise dot product, written out so no BLAS kernel (whose rounding varies by CPU) is involved."""
    return v[..., 0] * w[0] + v[..., 1] * w[1] + v[..., 2] * w[2]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.sqrt(v[..., 0] ** 2 + v[..., 1] ** 2 + v[..., 2] ** 2)[..., None]


def _polygon_mask(
    shape: tuple[int, int], points: list[tuple[float, float]], origin: tuple[int, int]
) -> np.ndarray:
    """Boolean mask of a polygon (canvas coordinates) over a window of ``shape`` at ``origin``."""
    mask = Image.new("L", (shape[1], shape[0]), 0)
    ImageDraw.Draw(mask).polygon([(x - origin[0], y - origin[1]) for x, y in points], fill=255)
    return np.asarray(mask) > 127


def _draw_sphere(canvas: np.ndarray, obj: SceneObject, k: int, base: np.ndarray) -> None:
    """A disc shaded as a sphere: radial diffuse gradient, and a highlight when metal."""
    cx, cy, r = obj.x * k, obj.y * k, obj.extent * k / 2
    win, xs, ys, _ = _window(canvas, (cx - r, cy - r, cx + r, cy + r))
    dx, dy = (xs - cx) / r, (ys - cy) / r
    d2 = dx * dx + dy * dy
    inside = d2 <= 1.0
    normals = np.stack([dx, dy, np.sqrt(np.clip(1.0 - d2, 0.0, 1.0))], axis=-1)
    win[inside] = _shade(base, normals[inside], obj.material == "metal")


def _draw_cube(canvas: np.ndarray, obj: SceneObject, k: int, base: np.ndarray) -> None:
    """A cube in oblique view: front square, lit top face, dark right face.

    Rubber faces are flat tones; metal faces get normals bent across the face so that the specular
    term draws a highlight on the front face.
    """
    x0, y0, x1, y1 = (v * k for v in obj.bbox)
    depth = 0.4  # oblique offset of the back edges, as a fraction of the front side
    s = (x1 - x0) / (1 + depth)
    d = depth * s
    faces = {  # face: (polygon, normal)
        "front": ([(x0, y0 + d), (x0 + s, y0 + d), (x0 + s, y1), (x0, y1)], (0.0, 0.0, 1.0)),
        "top": ([(x0, y0 + d), (x0 + d, y0), (x1, y0), (x0 + s, y0 + d)], (0.0, -1.0, 0.35)),
        "right": ([(x0 + s, y0 + d), (x1, y0), (x1, y0 + s), (x0 + s, y1)], (1.0, 0.0, 0.35)),
    }
    win, xs, ys, origin = _window(canvas, (x0, y0, x1, y1))
    metal = obj.material == "metal"
    for polygon, normal in faces.values():
        mask = _polygon_mask(win.shape[:2], polygon, origin)
        # u, v in [-1, 1] across the face's box: a slight bend for metal, none for rubber.
        px, py = zip(*polygon)
        u = (xs - min(px)) / max(1e-6, max(px) - min(px)) * 2 - 1
        v = (ys - min(py)) / max(1e-6, max(py) - min(py)) * 2 - 1
        bend = 0.45 if metal else 0.0
        normals = _unit(
            np.stack([normal[0] + bend * u, normal[1] + bend * v, np.full_like(u, normal[2])], -1)
        )
        win[mask] = _shade(base, normals[mask], metal)


def _draw_cylinder(canvas: np.ndarray, obj: SceneObject, k: int, base: np.ndarray) -> None:
    """An upright cylinder: curved body shaded across its width, and a lit elliptic top."""
    x0, y0, x1, y1 = (v * k for v in obj.bbox)
    cx = (x0 + x1) / 2
    r = 0.45 * (x1 - x0)
    ry = 0.35 * r  # the ellipses' half height: the camera looks down at ~20 degrees
    yt, yb = y0 + ry, y1 - ry
    win, xs, ys, _ = _window(canvas, (x0, y0, x1, y1))
    nx = (xs - cx) / r
    in_width = np.abs(nx) <= 1.0
    body = in_width & (((ys >= yt) & (ys <= yb)) | (nx * nx + ((ys - yb) / ry) ** 2 <= 1.0))
    top = nx * nx + ((ys - yt) / ry) ** 2 <= 1.0
    metal = obj.material == "metal"
    nxc = np.clip(nx, -1.0, 1.0)
    bend = 0.4 if metal else 0.0
    # Metal: tilt the body normals with height (v = -1 just below the top face, +1 at the bottom) so
    # the highlight lands on the visible upper left of the body.
    v = (ys - yt - ry) / max(1e-6, yb - yt - ry) * 2 - 1
    body_n = _unit(np.stack([nxc, bend * v, np.sqrt(1.0 - nxc * nxc)], axis=-1))
    win[body] = _shade(base, body_n[body], metal)
    # The top faces up and a little toward the viewer, so it is lit more than any part of the body;
    # a slightly darker rim separates it from the body when the colour saturates.
    top_n = _unit(np.stack([bend * nxc, np.full_like(nxc, -1.0), np.full_like(nxc, 0.6)], axis=-1))
    rim = nx * nx + ((ys - yt) / ry) ** 2 > 0.7
    win[top & ~rim] = _shade(base, top_n[top & ~rim], metal)
    win[top & rim] = _shade(base * 0.85, top_n[top & rim], metal)


_DRAW = {"sphere": _draw_sphere, "cube": _draw_cube, "cylinder": _draw_cylinder}


def render_scene(scene: Scene) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``scene.image_size`` pixels square (deterministic)."""
    k = _supersample(scene.image_size)
    side = scene.image_size * k
    canvas = np.empty((side, side, 3), dtype=np.uint8)
    canvas[:] = GROUND
    for obj in scene.objects:
        _DRAW[obj.shape](canvas, obj, k, np.asarray(COLORS[obj.color], dtype=np.float32))
    return Image.fromarray(canvas).resize((scene.image_size, scene.image_size), Image.Resampling.BOX)


# -------------------------------------------------------------------------------------- questions


def matches(obj: SceneObject | dict[str, Any], flt: dict[str, str]) -> bool:
    """Whether an object (a :class:`SceneObject` or a scene-json record) has every attribute in ``flt``."""
    get = obj.get if isinstance(obj, dict) else lambda a: getattr(obj, a)
    return all(get(a) == v for a, v in flt.items())


def noun_phrase(flt: dict[str, str], count: int = 2) -> str:
    """``{'size': 'large', 'shape': 'cube'}`` -> "large cubes" ("large cube" when ``count == 1``)."""
    words = [flt[a] for a in ATTRIBUTES[:-1] if a in flt]
    noun = flt.get("shape", "object")
    words.append(noun if count == 1 else noun + "s")
    return " ".join(words)


def _describe(obj: SceneObject, with_material: bool) -> str:
    """ "a large red cube" (with the material, "a large red metal cube", when the question is about it)."""
    words = [obj.size, obj.color] + ([obj.material] if with_material else []) + [obj.shape]
    return "a " + " ".join(words)


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _see_step(flt: dict[str, str], objs: list[SceneObject], with_material: bool) -> str:
    """ "I see 2 red cubes: a large red cube and a small red cube." or "I see no red cubes." """
    if not objs:
        return f"I see no {noun_phrase(flt)}."
    listed = _join([_describe(o, with_material) for o in objs])
    return f"I see {len(objs)} {noun_phrase(flt, len(objs))}: {listed}."


def _left_to_right(scene: Scene) -> list[SceneObject]:
    return sorted(scene.objects, key=lambda o: (o.x, o.y))


def count_question(scene: Scene, flt: dict[str, str]) -> Question:
    """Count the objects matching ``flt`` (empty: all objects), one step per shape present, then a total."""
    with_material = "material" in flt
    matched = [o for o in _left_to_right(scene) if matches(o, flt)]
    n = len(matched)
    steps, counts = [], []
    for shape in [flt["shape"]] if "shape" in flt else SHAPES:
        group = [o for o in matched if o.shape == shape]
        if group:
            steps.append(_see_step({**flt, "shape": shape}, group, with_material))
            counts.append(len(group))
    total = noun_phrase(flt, n)
    if not matched:
        steps = [_see_step(flt, [], with_material), f"So there are 0 {total}."]
    elif len(counts) > 1:
        steps.append(f"In total {' + '.join(map(str, counts))} = {n} {total}.")
    else:
        steps.append(f"So there {'is' if n == 1 else 'are'} {n} {total}.")
    text = COUNT_ALL_QUESTION if not flt else f"How many {noun_phrase(flt)} are there?"
    return Question("count_all" if not flt else "count_attr", text, n, tuple(steps), {"filter": dict(flt)})


def compare_question(scene: Scene, attribute: str, first: str, second: str) -> Question:
    """ "How many more <first> than <second> are there?"; requires count(first) >= count(second)."""
    objs = _left_to_right(scene)
    fa, fb = {attribute: first}, {attribute: second}
    a = [o for o in objs if matches(o, fa)]
    b = [o for o in objs if matches(o, fb)]
    if len(a) < len(b):
        raise DataError(
            f"compare question would have a negative answer: {first} {len(a)} < {second} {len(b)}"
        )
    with_material = attribute == "material"
    steps = (
        _see_step(fa, a, with_material),
        _see_step(fb, b, with_material),
        f"The difference is {len(a)} - {len(b)} = {len(a) - len(b)}.",
    )
    text = f"How many more {noun_phrase(fa)} than {noun_phrase(fb)} are there?"
    return Question("compare", text, len(a) - len(b), steps, {"compare": [attribute, first, second]})


#: The attribute a filter chain counts first (shape, then colour, material, size).
_CHAIN_ORDER = ("shape", "color", "material", "size")


def filter_chain_question(scene: Scene, flt: dict[str, str]) -> Question:
    """Count by two attributes in two steps: the objects with the first attribute, then those of them that
    also have the second ("I see 3 red objects: ...", "Of these, 2 are large: ...", "So there are 2 large
    red objects.")."""
    if len(flt) != 2:
        raise DataError(f"a filter-chain question needs a 2-attribute filter, got {flt!r}")
    first_attr, second_attr = sorted(flt, key=_CHAIN_ORDER.index)
    with_material = "material" in flt
    first = {first_attr: flt[first_attr]}
    a = [o for o in _left_to_right(scene) if matches(o, first)]
    b = [o for o in a if matches(o, flt)]
    steps = [_see_step(first, a, with_material)]
    if a and b:
        listed = _join([_describe(o, with_material) for o in b])
        steps.append(f"Of these, {len(b)} {'is' if len(b) == 1 else 'are'} {flt[second_attr]}: {listed}.")
    elif a:
        steps.append(f"Of these, none {'is' if len(a) == 1 else 'are'} {flt[second_attr]}.")
    n = len(b)
    steps.append(f"So there {'is' if n == 1 else 'are'} {n} {noun_phrase(flt, n)}.")
    text = f"How many {noun_phrase(flt)} are there?"
    return Question("count_two_attr", text, n, tuple(steps), {"filter": dict(flt)})


def union_question(scene: Scene, attribute: str, first: str, second: str) -> Question:
    """ "How many red objects and blue objects are there in total?": two counts, then their sum. Both values
    belong to one attribute, so no object is counted twice."""
    if first == second:
        raise DataError(f"an add question needs two different {attribute} values, got {first!r} twice")
    objs = _left_to_right(scene)
    fa, fb = {attribute: first}, {attribute: second}
    a = [o for o in objs if matches(o, fa)]
    b = [o for o in objs if matches(o, fb)]
    with_material = attribute == "material"
    steps = (
        _see_step(fa, a, with_material),
        _see_step(fb, b, with_material),
        f"In total {len(a)} + {len(b)} = {len(a) + len(b)}.",
    )
    text = f"How many {noun_phrase(fa)} and {noun_phrase(fb)} are there in total?"
    return Question("add", text, len(a) + len(b), steps, {"add": [attribute, first, second]})


def _value_text(attribute: str, value: str) -> str:
    """How a value reads after "are not": "cubes" for a shape, the value itself otherwise."""
    return noun_phrase({"shape": value}) if attribute == "shape" else value


def complement_question(scene: Scene, attribute: str, value: str) -> Question:
    """ "How many objects are not cubes?": count everything, count the cubes, subtract."""
    n = len(scene.objects)
    flt = {attribute: value}
    k = [o for o in _left_to_right(scene) if matches(o, flt)]
    steps = (
        f"I see {n} {'object' if n == 1 else 'objects'} in total.",
        _see_step(flt, k, attribute == "material"),
        f"So {n} - {len(k)} = {n - len(k)}.",
    )
    text = f"How many objects are not {_value_text(attribute, value)}?"
    return Question("subtract", text, n - len(k), steps, {"subtract": [attribute, value]})


_VALUES = {"shape": SHAPES, "color": tuple(COLORS), "size": SIZES, "material": MATERIALS}
#: Attribute filters of count_attr (one attribute) and count_two_attr (two) questions.
_FILTER_PATTERNS = {
    1: (("color",), ("size",), ("material",), ("shape",)),
    2: (("size", "shape"), ("color", "shape"), ("material", "shape"), ("size", "color")),
}


def _random_filter(rng: random.Random, scene: Scene, n_attributes: int) -> dict[str, str]:
    """A filter on ``n_attributes`` attributes, mostly taken from an object in the scene so that answers are
    rarely 0."""
    pattern = rng.choice(_FILTER_PATTERNS[n_attributes])
    if rng.random() < 0.8:
        anchor = rng.choice(scene.objects)
        return {a: getattr(anchor, a) for a in pattern}
    return {a: rng.choice(_VALUES[a]) for a in pattern}


def _random_attribute(rng: random.Random) -> str:
    """Mostly shapes and colours (more values, more varied answers), sometimes size or material."""
    return rng.choices(("shape", "color", "size", "material"), weights=(0.35, 0.35, 0.15, 0.15))[0]


def _random_union(rng: random.Random, scene: Scene) -> Question:
    attribute = _random_attribute(rng)
    first = getattr(rng.choice(scene.objects), attribute)  # a value present in the scene
    second = rng.choice([v for v in _VALUES[attribute] if v != first])
    return union_question(scene, attribute, first, second)


def _random_complement(rng: random.Random, scene: Scene) -> Question:
    attribute = _random_attribute(rng)
    value = getattr(rng.choice(scene.objects), attribute) if rng.random() < 0.8 else rng.choice(_VALUES[attribute])
    return complement_question(scene, attribute, value)


def _random_compare(rng: random.Random, scene: Scene) -> Question:
    """A compare question: mostly shapes, sometimes colour, size or material; larger count first."""
    attribute = rng.choices(("shape", "color", "size", "material"), weights=(0.55, 0.25, 0.1, 0.1))[0]
    first = getattr(rng.choice(scene.objects), attribute)  # a value present in the scene
    second = rng.choice([v for v in _VALUES[attribute] if v != first])
    na = sum(matches(o, {attribute: first}) for o in scene.objects)
    nb = sum(matches(o, {attribute: second}) for o in scene.objects)
    if nb > na or (na == nb and rng.random() < 0.5):
        first, second = second, first
    return compare_question(scene, attribute, first, second)


def _check_mix(question_mix: dict[str, float] | str | None) -> dict[str, float]:
    if isinstance(question_mix, str):
        if question_mix not in QUESTION_MIXES:
            raise DataError(f"unknown question mix {question_mix!r}; expected one of {tuple(QUESTION_MIXES)} "
                            "or a mapping of question types to weights")
        question_mix = QUESTION_MIXES[question_mix]
    mix = dict(QUESTION_MIX if question_mix is None else question_mix)
    unknown = set(mix) - set(QUESTION_TYPES)
    if unknown or not mix or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise DataError(
            f"question_mix must map some of {QUESTION_TYPES} to non-negative weights with a positive sum, "
            f"got {question_mix!r}"
        )
    return mix


def sample_question(
    rng: random.Random, scene: Scene, question_mix: dict[str, float] | str | None = None
) -> Question:
    """Draw a question type from ``question_mix`` (relative weights, or a name in ``QUESTION_MIXES``), then
    a question of that type."""
    mix = _check_mix(question_mix)
    kind = rng.choices(list(mix), weights=list(mix.values()))[0]
    if kind == "count_all":
        return count_question(scene, {})
    if kind == "count_attr":
        return count_question(scene, _random_filter(rng, scene, 1))
    if kind == "count_two_attr":
        return filter_chain_question(scene, _random_filter(rng, scene, 2))
    if kind == "add":
        return _random_union(rng, scene)
    if kind == "subtract":
        return _random_complement(rng, scene)
    return _random_compare(rng, scene)


# ------------------------------------------------------------------------------- checking claims

_WORDS = {**{c: "color" for c in COLORS}, **{z: "size" for z in SIZES}, **{m: "material" for m in MATERIALS}}
_SEE = re.compile(r"I see (no|\d+) ([a-z ]+?)(?: in total)?(?::|\.|$)")
_OF_THESE = re.compile(r"Of these, (none|\d+) (?:is|are) ([a-z]+)(?::|\.|$)")


def _phrase_filter(phrase: str) -> dict[str, str] | None:
    """ "large red cubes" -> {'size': 'large', 'color': 'red', 'shape': 'cube'}; None if not a noun phrase."""
    *adjectives, noun = phrase.split() or [""]
    flt: dict[str, str] = {}
    for w in adjectives:
        if w not in _WORDS or _WORDS[w] in flt:
            return None
        flt[_WORDS[w]] = w
    shape = noun[:-1] if noun.endswith("s") else noun
    if shape in SHAPES:
        flt["shape"] = shape
    elif shape != "object":
        return None
    return flt


def count_claims(text: str) -> list[tuple[dict[str, str], int]]:
    """The counts a completion states, as ``(filter, count)``: "I see 2 red cubes: ..." gives
    ``({'color': 'red', 'shape': 'cube'}, 2)``, "I see 5 objects in total." ``({}, 5)``, and "Of these, 1 is
    large" the previous filter plus ``size=large``. Sentences in other forms state nothing here."""
    claims: list[tuple[dict[str, str], int]] = []
    last: dict[str, str] | None = None
    for m in re.finditer(f"{_SEE.pattern}|{_OF_THESE.pattern}", text):
        if m.group(1) is not None:
            flt = _phrase_filter(m.group(2))
            n = m.group(1)
        else:
            word = m.group(4)
            flt = None if last is None or word not in _WORDS or _WORDS[word] in last else {**last, _WORDS[word]: word}
            n = m.group(3)
        if flt is None:
            continue
        claims.append((flt, 0 if n in ("no", "none") else int(n)))
        last = flt
    return claims


def check_claims(text: str, objects: list[dict[str, Any]]) -> tuple[int, int]:
    """``(stated, right)``: how many counts ``text`` states and how many of them equal the count of matching
    objects in the scene (``objects``: the scene JSON's object records)."""
    claims = count_claims(text)
    right = sum(n == sum(matches(o, flt) for o in objects) for flt, n in claims)
    return len(claims), right


_EQUATION = re.compile(r"(\d+(?:\s*[+-]\s*\d+)+)\s*=\s*(-?\d+)")
#: What kind of mistake a wrong answer rests on (``error_kind``), in the order they are checked.
ERROR_KINDS = ("format", "perception", "arithmetic", "logic")


def equations(text: str) -> list[tuple[str, int, int]]:
    """Every ``a + b - c = d`` a completion writes, as ``(left side, its value, the stated result)``."""
    out = []
    for m in _EQUATION.finditer(text):
        terms = re.findall(r"([+-]?)\s*(\d+)", m.group(1))
        value = sum(-int(n) if sign == "-" else int(n) for sign, n in terms)
        out.append((m.group(1), value, int(m.group(2))))
    return out


def error_kind(text: str, extracted: str | None, formatted: bool, objects: list[dict[str, Any]]) -> str:
    """Why a wrong answer is wrong, read against the scene JSON (``objects``): ``format`` (no tagged answer),
    ``perception`` (a count it states contradicts the scene), ``arithmetic`` (its counts are right but an
    equation it writes is not), else ``logic`` (right counts and sums, wrong conclusion: the wrong things
    combined, or an answer the steps do not give)."""
    if not formatted or extracted is None:
        return "format"
    stated, right = check_claims(text, objects)
    if right < stated:
        return "perception"
    if any(value != result for _, value, result in equations(text)):
        return "arithmetic"
    return "logic"


_LISTING = re.compile(r"^(I see \d+ [a-z ]+|Of these, \d+ (?:is|are) [a-z]+): .+\.$")


def without_listing(step: str) -> str:
    """A gold step without the objects it lists: "I see 2 cubes: a large red cube and a small gray cube."
    -> "I see 2 cubes." (the count, which is what later steps use; the listing costs most of the tokens)."""
    m = _LISTING.match(step)
    return f"{m.group(1)}." if m else step


# ------------------------------------------------------------------------------------- generation


def scene_id(index: int, seed: int = 0, condition: str = DEFAULT_CONDITION) -> str:
    """The file stem of scene ``index``: ``clevr_A_0_000042``."""
    return f"clevr_{condition}_{seed}_{index:06d}"


def make_clevr_example(
    index: int,
    seed: int = 0,
    condition: str = DEFAULT_CONDITION,
    image_size: int = IMAGE_SIZE,
    num_objects: int | tuple[int, int] = NUM_OBJECTS,
    question_mix: dict[str, float] | str | None = None,
    questions_per_scene: int = 1,
    list_objects: bool = True,
) -> ClevrExample:
    """Scene ``index`` of the set ``(seed, condition)``, rendered, with its question samples (in memory).

    Sample ids are ``<scene_id>_q<j>``; image paths are ``images/<scene_id>.png`` (relative to the
    directory :func:`write_clevr` writes), and ``meta["scene"]`` is ``scenes/<scene_id>.json``. With
    ``list_objects=False`` the gold steps state counts without listing the objects (:func:`without_listing`).
    """
    if questions_per_scene < 1:
        raise DataError(f"questions_per_scene must be >= 1, got {questions_per_scene}")
    # A string seed is hashed with SHA-512 by `random`, so it is stable across runs and platforms.
    rng = random.Random(f"vlm-mig-clevr:{seed}:{condition}:{index}")
    scene = sample_scene(rng, condition, num_objects, image_size)
    stem = scene_id(index, seed, condition)
    samples = []
    for j in range(questions_per_scene):
        q = sample_question(rng, scene, question_mix)
        meta = {
            "source": "synthetic_clevr",
            "question_type": q.kind,
            "condition": condition,
            "scene": f"scenes/{stem}.json",
            "num_objects": len(scene.objects),
            **q.spec,
        }
        samples.append(
            Sample(
                id=f"{stem}_q{j}",
                answer=str(q.answer),
                task="count",
                question=q.text,
                images=[f"images/{stem}.png"],
                gold_steps=list(q.steps) if list_objects else [without_listing(t) for t in q.steps],
                meta=meta,
            )
        )
    return ClevrExample(scene, render_scene(scene), samples, scene.to_json(f"{stem}.png", index))


def write_clevr(
    out_dir: str | Path,
    n: int,
    condition: str = DEFAULT_CONDITION,
    seed: int = 0,
    image_size: int = IMAGE_SIZE,
    num_objects: int | tuple[int, int] = NUM_OBJECTS,
    question_mix: dict[str, float] | str | None = None,
    questions_per_scene: int = 1,
    list_objects: bool = True,
) -> list[Sample]:
    """Write ``n`` scenes: ``out_dir/images/*.png``, ``out_dir/scenes/*.json`` and ``out_dir/data.jsonl``.

    ``data.jsonl`` holds one ``Sample.to_dict()`` per line (``n * questions_per_scene`` lines), image
    paths relative to ``out_dir``. The same arguments give byte-identical files.
    """
    if n < 0:
        raise DataError(f"n must be >= 0, got {n}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "scenes").mkdir(parents=True, exist_ok=True)
    samples: list[Sample] = []
    for index in range(n):
        ex = make_clevr_example(
            index, seed, condition, image_size, num_objects, question_mix, questions_per_scene, list_objects
        )
        ex.image.save(out / ex.samples[0].images[0], format="PNG")
        (out / ex.samples[0].meta["scene"]).write_text(json.dumps(ex.scene_json, indent=1) + "\n")
        samples.extend(ex.samples)
    with open(out / "data.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(s.to_dict(), ensure_ascii=False) + "\n" for s in samples)
    return samples
