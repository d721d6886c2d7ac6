"""Built-in detection / segmentation scenes: handwritten digits among clutter.

:func:`make_digit_scenes` extends the classification bench's cluttered digits to several objects
per image. A scene is built as follows, every draw from ``numpy.random.default_rng(seed)``:

1. The 1797 source digits of scikit-learn's ``load_digits`` are split per class into train and
   test sources (``test_fraction`` of each class to test); a split's scenes use only its own
   sources, for objects and clutter alike, so no test digit is ever seen in training. Each split
   uses its sources in turn (a shuffled cycle) for its objects.
2. Background: black, or (``background="photo"``) a random crop of one of scikit-learn's two
   bundled photos (``china.jpg``, ``flower.jpg``), randomly mirrored and dimmed to half its
   brightness so that the ink stays visible.
3. Clutter: ``clutter`` fragments, crops of half a digit's side cut from *other* source digits
   (at least a fifth of their ink), placed where they touch no object's box (a fragment that finds
   no free place in 20 tries is left out). Fragments are not objects: they are not annotated.
4. Objects: ``objects`` digits, each upscaled by an integer factor drawn from ``scales``
   (``8·scale`` pixels square), placed uniformly at random such that the IoU of its box with every
   earlier object's box is at most ``max_overlap_iou`` and neither box covers more than
   ``max_covered`` of the other (an object that finds no such place in 50 tries is left out, so
   a scene has *up to* ``objects[1]`` digits and at least one).
5. Ink: a digit's grey level (0–1 after scaling the 0–16 levels) is its opacity; levels below
   :data:`INK` are set to 0, so every painted pixel of an object is in its mask. Pieces are
   painted in order (clutter, then objects; later objects on top) in a random saturated colour
   (``colour=True``) or white.

Annotations per scene: tight boxes around each object's ink (``float32`` ``(x0, y0, x1, y1)``,
exclusive ends, integer values), labels 0–9 (class names ``"0"``..``"9"``), instance masks (the
full ink of each digit, ``bool (n, H, W)``; two digits' masks may share pixels where they cross)
and a semantic mask (``uint8 (H, W)``: 0 background and clutter, ``1 + label`` where a digit is
the top-most ink). The same arguments give bit-identical arrays on every run; nothing is
downloaded.
"""

from __future__ import annotations

import colorsys

import numpy as np

from attnzoo.datasets.data import DetectionData
from attnzoo.datasets.digits import ink_crop, sample_photos, split_sources, upscaled_digits

__all__ = ["INK", "make_digit_scenes"]

#: grey levels (0–1) below this are not ink: not painted, not in any mask
INK = 0.25
_PHOTO_DIM = 0.5
_OBJECT_TRIES, _CLUTTER_TRIES = 50, 20


def _fail(arg: str, expected: str, value: object) -> ValueError:
    return ValueError(f"make_digit_scenes: {arg} must be {expected}; got {value!r}")


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _int_range(arg: str, value: object, low: int) -> tuple[int, int]:
    """An int ``k`` (→ ``(k, k)``) or a pair ``(lo, hi)`` with ``low <= lo <= hi``."""
    pair = (value, value) if _is_int(value) else value
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or not all(map(_is_int, pair))
        or not low <= pair[0] <= pair[1]
    ):
        raise _fail(arg, f"an integer or a pair (lo, hi) of integers with {low} <= lo <= hi", value)
    return int(pair[0]), int(pair[1])


def _canvas(value: object) -> tuple[int, int]:
    hw = (value, value) if _is_int(value) else value
    if (
        not isinstance(hw, (tuple, list))
        or len(hw) != 2
        or not all(map(_is_int, hw))
        or not all(v >= 32 and v % 32 == 0 for v in hw)
    ):
        raise _fail("canvas", "a positive multiple of 32 or a pair (H, W) of them", value)
    return int(hw[0]), int(hw[1])


def _overlaps(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IoU and covered share (intersection over the smaller box) of every box in ``a (T, 4)``
    with every box in ``b (m, 4)``, both ``(T, m)``."""
    a, b = a[:, None, :], b[None, :, :]
    iw = (np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])).clip(0)
    ih = (np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])).clip(0)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / (area_a + area_b - inter), inter / np.minimum(area_a, area_b)


def _candidates(
    hw: tuple[int, int], side: int, tries: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``tries`` random top-left corners ``(ys, xs)`` of a ``side`` square inside the canvas."""
    return (
        rng.integers(0, hw[0] - side + 1, size=tries),
        rng.integers(0, hw[1] - side + 1, size=tries),
    )


def _colour(rng: np.random.Generator, colour: bool) -> np.ndarray:
    if not colour:
        return np.ones(3, np.float32)
    h, s, v = rng.random(3)
    return np.array(colorsys.hsv_to_rgb(h, 0.5 + 0.5 * s, 0.75 + 0.25 * v), np.float32)


def _paint(img: np.ndarray, alpha: np.ndarray, y: int, x: int, colour: np.ndarray) -> None:
    h, w = alpha.shape
    region = img[y : y + h, x : x + w]
    a = alpha[..., None]
    region *= 1.0 - a
    region += a * colour


def _background(
    hw: tuple[int, int], photos: tuple[np.ndarray, ...] | None, rng: np.random.Generator
) -> np.ndarray:
    h, w = hw
    if photos is None:
        return np.zeros((h, w, 3), np.float32)
    photo = photos[int(rng.integers(len(photos)))]
    y, x = (int(v) for v in rng.integers(0, [photo.shape[0] - h + 1, photo.shape[1] - w + 1]))
    crop = photo[y : y + h, x : x + w]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return crop * np.float32(_PHOTO_DIM)


def _ink_extents(alpha: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Per digit ``(x0, y0, x1, y1)`` of its ink inside its square (exclusive ends)."""
    rows, cols = alpha.any(axis=2), alpha.any(axis=1)
    d = alpha.shape[-1]
    first = lambda m: m.argmax(axis=1)  # noqa: E731
    last = lambda m: d - m[:, ::-1].argmax(axis=1)  # noqa: E731
    return list(
        zip(first(cols).tolist(), first(rows).tolist(), last(cols).tolist(), last(rows).tolist())
    )


def _place_objects(
    n: int,
    cycle: list[int],
    sources: np.ndarray,
    extents: dict,
    hw: tuple[int, int],
    max_iou: float,
    max_covered: float,
    rng: np.random.Generator,
) -> list[tuple]:
    """``(source, scale, y, x, box)`` for up to ``n`` objects whose boxes overlap pairwise with
    IoU <= max_iou and cover at most ``max_covered`` of each other."""
    placed: list[tuple] = []
    scales = sorted(extents)
    for _ in range(n):
        if not cycle:
            cycle.extend(rng.permutation(sources).tolist())
        src = cycle.pop()
        scale = int(rng.integers(scales[0], scales[-1] + 1))
        x0, y0, x1, y1 = extents[scale][src]
        d = 8 * scale
        ys, xs = _candidates(hw, d, _OBJECT_TRIES, rng)
        cand = np.stack([xs + x0, ys + y0, xs + x1, ys + y1], axis=1)
        ok = np.ones(len(cand), bool)
        if placed:
            iou, covered = _overlaps(cand, np.array([p[4] for p in placed]))
            ok = ((iou <= max_iou) & (covered <= max_covered)).all(axis=1)
        j = int(ok.argmax())
        if ok[j]:  # the first candidate that overlaps no earlier object too much
            placed.append((src, scale, int(ys[j]), int(xs[j]), tuple(cand[j].tolist())))
    return placed


def _place_clutter(
    n: int,
    objects: list[tuple],
    sources: np.ndarray,
    digits: dict,
    hw: tuple[int, int],
    rng: np.random.Generator,
) -> list[tuple]:
    """``(source, crop, y, x)`` for up to ``n`` fragments touching no object box."""
    used = {p[0] for p in objects}
    boxes = np.array([p[4] for p in objects]).reshape(-1, 4)
    scales = sorted(digits)
    out = []
    for _ in range(n):
        other = int(sources[rng.integers(len(sources))])
        while other in used and len(sources) > len(used):
            other = int(sources[rng.integers(len(sources))])
        scale = int(rng.integers(scales[0], scales[-1] + 1))
        size = 4 * scale
        crop = ink_crop(digits[scale][other], size, rng)
        ys, xs = _candidates(hw, size, _CLUTTER_TRIES, rng)
        ys, xs = ys[:, None], xs[:, None]
        free = (
            (xs + size <= boxes[:, 0])
            | (xs >= boxes[:, 2])
            | (ys + size <= boxes[:, 1])
            | (ys >= boxes[:, 3])
        ).all(axis=1)
        j = int(free.argmax())
        if free[j]:
            out.append((other, crop, int(ys[j, 0]), int(xs[j, 0])))
    return out


def _render_split(
    split: str,
    n: int,
    sources: np.ndarray,
    digits: dict,
    labels: np.ndarray,
    *,
    hw: tuple[int, int],
    objects: tuple[int, int],
    clutter: tuple[int, int],
    photos: tuple[np.ndarray, ...] | None,
    colour: bool,
    max_iou: float,
    max_covered: float,
    rng: np.random.Generator,
) -> DetectionData:
    h, w = hw
    images = np.empty((n, h, w, 3), np.uint8)
    semantic = np.zeros((n, h, w), np.uint8)
    boxes, labs, masks, obj_src, clut_src = [], [], [], [], []
    cycle: list[int] = []
    extents = {s: _ink_extents(a) for s, a in digits.items()}
    for i in range(n):
        img = _background(hw, photos, rng)
        placed = _place_objects(
            int(rng.integers(objects[0], objects[1] + 1)),
            cycle,
            sources,
            extents,
            hw,
            max_iou,
            max_covered,
            rng,
        )
        frags = _place_clutter(
            int(rng.integers(clutter[0], clutter[1] + 1)), placed, sources, digits, hw, rng
        )
        for _src, crop, y, x in frags:
            _paint(img, crop, y, x, _colour(rng, colour))
        inst = np.zeros((len(placed), h, w), bool)
        for k, (src, scale, y, x, _box) in enumerate(placed):
            alpha = digits[scale][src]
            d = alpha.shape[0]
            _paint(img, alpha, y, x, _colour(rng, colour))
            ink = alpha > 0
            inst[k, y : y + d, x : x + d] = ink
            semantic[i, y : y + d, x : x + d][ink] = 1 + labels[src]
        img *= 255.0
        img += 0.5
        images[i] = img  # values in [0.5, 255.5): the cast truncates, i.e. rounds
        boxes.append(np.array([p[4] for p in placed], np.float32).reshape(-1, 4))
        labs.append(labels[[p[0] for p in placed]].astype(np.int64))
        masks.append(inst)
        obj_src.append(np.array([p[0] for p in placed], np.int64))
        clut_src.append(np.array([f[0] for f in frags], np.int64))
    return DetectionData(
        images=images,
        boxes=boxes,
        labels=labs,
        classes=tuple(str(c) for c in range(10)),
        names=[f"{split}_{i:06d}" for i in range(n)],
        instance_masks=masks,
        semantic_masks=semantic,
        meta={"sources": obj_src, "clutter_sources": clut_src, "source_pool": sources},
    )


def make_digit_scenes(
    n_train: int = 2000,
    n_test: int = 500,
    *,
    canvas: int | tuple[int, int] = 128,
    objects: int | tuple[int, int] = (1, 4),
    scales: int | tuple[int, int] = (2, 5),
    clutter: int | tuple[int, int] = (4, 8),
    background: str = "black",
    colour: bool = True,
    max_overlap_iou: float = 0.2,
    max_covered: float = 0.4,
    test_fraction: float = 0.3,
    seed: int = 0,
) -> tuple[DetectionData, DetectionData]:
    """Generate the built-in digit scenes (see the module docstring for how they are drawn).

    Args:
        n_train, n_test: scenes per split.
        canvas: image side in pixels, or ``(H, W)``; multiples of 32 (YOLO strides).
        objects: digits per scene, an int or an inclusive range ``(lo, hi)``, ``lo >= 1``.
        scales: integer upscaling factor of the 8×8 digits, an int or inclusive range; ``(2, 5)``
            gives 16 to 40 pixel digits. ``8 · hi`` must fit in the canvas.
        clutter: digit fragments per scene (not objects), an int or inclusive range.
        background: ``"black"`` or ``"photo"`` (crops of scikit-learn's sample photos).
        colour: draw each digit and fragment in a random saturated colour (else white).
        max_overlap_iou: largest IoU allowed between two objects' boxes, in ``[0, 1)``.
        max_covered: largest share of an object's box that another object's box may cover, in
            ``[0, 1]`` (stops a small digit from sitting inside a large one's box, which the IoU
            limit alone allows).
        test_fraction: share of each class's source digits reserved for the test split.
        seed: the generator's seed; the same arguments give bit-identical arrays.

    Returns:
        ``(train, test)`` :class:`~attnzoo.datasets.DetectionData` with ``images`` ``uint8
        (N, H, W, 3)``, ``boxes``, ``labels``, ``instance_masks``, ``semantic_masks`` and
        ``meta["sources"]`` / ``meta["clutter_sources"]`` (``load_digits`` indices used per
        scene) and ``meta["source_pool"]`` (the split's source digits).
    """
    for arg, v in (("n_train", n_train), ("n_test", n_test)):
        if not _is_int(v) or v < 1:
            raise _fail(arg, "an integer >= 1", v)
    hw = _canvas(canvas)
    objects_r = _int_range("objects", objects, 1)
    scales_r = _int_range("scales", scales, 1)
    clutter_r = _int_range("clutter", clutter, 0)
    if 8 * scales_r[1] > min(hw):
        raise _fail(
            "scales",
            f"at most {min(hw) // 8} for a {hw[0]}x{hw[1]} canvas (8·scale pixel digits)",
            scales,
        )
    if background not in ("black", "photo"):
        raise _fail("background", "'black' or 'photo'", background)
    if not isinstance(colour, (bool, np.bool_)):
        raise _fail("colour", "True or False", colour)
    if (
        isinstance(max_overlap_iou, bool)
        or not isinstance(max_overlap_iou, (int, float))
        or not 0.0 <= max_overlap_iou < 1.0
    ):
        raise _fail("max_overlap_iou", "a number in [0, 1)", max_overlap_iou)
    if (
        isinstance(max_covered, bool)
        or not isinstance(max_covered, (int, float))
        or not 0.0 <= max_covered <= 1.0
    ):
        raise _fail("max_covered", "a number in [0, 1]", max_covered)
    if (
        isinstance(test_fraction, bool)
        or not isinstance(test_fraction, (int, float))
        or not 0.0 < test_fraction < 1.0
    ):
        raise _fail("test_fraction", "a number in (0, 1)", test_fraction)
    if not _is_int(seed):
        raise _fail("seed", "an integer", seed)

    digits = {}
    for s in range(scales_r[0], scales_r[1] + 1):
        imgs, labels = upscaled_digits(s)
        imgs[imgs < INK] = 0.0
        digits[s] = imgs
    rng = np.random.default_rng(seed)
    train_src, test_src = split_sources(labels, float(test_fraction), rng)
    photos = sample_photos(*hw) if background == "photo" else None
    kw = dict(
        hw=hw,
        objects=objects_r,
        clutter=clutter_r,
        photos=photos,
        colour=bool(colour),
        max_iou=float(max_overlap_iou),
        max_covered=float(max_covered),
        rng=rng,
    )
    train = _render_split("train", n_train, train_src, digits, labels, **kw)
    test = _render_split("test", n_test, test_src, digits, labels, **kw)
    return train, test
