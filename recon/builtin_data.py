"""Image pools that need no download: sklearn digits, a seeded synthetic generator, and local CIFAR-10.

Every loader returns a validated `Dataset` (float32 (N, C, H, W) in [0, 1], int64 labels), so the rest of
recon can treat a built-in pool exactly like a competition file.
"""

from __future__ import annotations

import colorsys
import functools
import os
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from recon.dataset_io import Dataset, DatasetError, validate_dataset

__all__ = ["load_digits_pool", "make_synthetic", "load_cifar10", "load_pool"]


# --------------------------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    small = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0)[:, None]  # (N, 1, 8, 8)
    big = F.interpolate(small, size=(32, 32), mode="bilinear", align_corners=False)
    images = big.clamp_(0.0, 1.0).expand(-1, 3, -1, -1).numpy()
    ds = validate_dataset(images, np.asarray(bunch.target), source="sklearn digits")
    ds.images.flags.writeable = False
    ds.labels.flags.writeable = False
    return ds.images, ds.labels


def load_digits_pool() -> Dataset:
    """A real (if tiny) image pool that ships with scikit-learn, so tests and demos work offline.

    Digits are upscaled to 32x32 RGB so they fit models built for CIFAR-shaped input. Each call returns
    fresh copies: the cached originals stay intact whatever the caller does with its arrays.
    """
    images, labels = _digits_arrays()
    return Dataset(images.copy(), labels.copy())


# ------------------------------------------------------------------------------------------ synthetic

_SHAPES = ("disc", "square", "hstripes", "vstripes", "ring", "triangle", "gradient")
# Entropy is always [tag, seed, a, b]: SeedSequence pads short entropy with zeros, so [a, b] == [a, b, 0].
_TAG_CLASS, _TAG_STYLE, _TAG_IMAGES, _TAG_SHUFFLE = 0x5C1A55, 0x575E1E, 0x1A6E5, 0x5F0FF1E


def _rng(tag: int, seed: int, a: int = 0, b: int = 0) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([tag, seed, a, b]))


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: np.ndarray, st: dict, px: float) -> np.ndarray:
    """Soft (anti-aliased) coverage in [0, 1]; `sd` is a signed distance, positive inside."""
    if shape == "disc":
        sd = r - np.hypot(dx, dy)
    elif shape == "square":
        sd = 0.85 * r - np.maximum(np.abs(dx), np.abs(dy))
    elif shape == "ring":
        sd = 0.25 * r - np.abs(np.hypot(dx, dy) - r)
    elif shape == "triangle":  # apex up at (0, -r), base at dy = 0.6 r, half-width 0.95 r
        h, a = 1.6 * r, 0.95 * r
        side = (a * (dy + r) - h * np.abs(dx)) / np.sqrt(h * h + a * a)
        sd = np.minimum(0.6 * r - dy, side)
    elif shape in ("hstripes", "vstripes"):
        k = st["stripes"]
        wave = np.sin(np.pi * k * (dy if shape == "hstripes" else dx))
        sd = wave / (np.pi * k)
    elif shape == "gradient":
        proj = dx * np.cos(st["grad_angle"]) + dy * np.sin(st["grad_angle"])
        return np.clip(0.5 + proj / 1.5, 0.0, 1.0)
    else:  # pragma: no cover - _SHAPES is closed
        raise AssertionError(shape)
    return np.clip(0.5 + sd / px, 0.0, 1.0)


def _class_images(out: np.ndarray, c: int, num_classes: int, styles: int, seed: int) -> None:
    """Fill `out` (n, 3, size, size) with class c; vectorised over images, looping only over styles."""
    n, size = len(out), out.shape[-1]
    crng = _rng(_TAG_CLASS, seed, c)
    # Class identity: a hue and a texture orientation shared by all its styles (what a model can learn).
    hue = (c + crng.uniform(-0.15, 0.15)) / num_classes
    bg_hue = hue + (0.3 if c % 2 == 0 else 0.7)  # alternating offset: neighbouring hues get far-apart bgs
    orient = np.pi * (c + crng.uniform(-0.15, 0.15)) / num_classes
    shape_order = np.concatenate([crng.permutation(len(_SHAPES)) for _ in range(-(-styles // len(_SHAPES)))])
    # Stratified background lightness, so no two styles of a class share it (they are distinct modes).
    bg_value = 0.3 + 0.6 * (crng.permutation(styles) + 0.5 + crng.uniform(-0.3, 0.3, size=styles)) / styles

    style_params = []
    for s in range(styles):
        srng = _rng(_TAG_STYLE, seed, c, s)
        style_params.append({
            "shape": _SHAPES[shape_order[s]],
            "fg": _hsv(hue + srng.normal(0, 0.015), srng.uniform(0.7, 1.0), srng.uniform(0.65, 1.0)),
            # bg lightness separates the modes of one class; its class-tied hue keeps it class-specific
            "bg": _hsv(bg_hue + srng.uniform(-0.05, 0.05), srng.uniform(0.5, 0.8), bg_value[s]),
            "centre": srng.uniform(-0.15, 0.15, size=2).astype(np.float32),
            "radius": np.float32(srng.uniform(0.35, 0.6)),
            "stripes": float(srng.integers(2, 5)),
            "grad_angle": srng.uniform(0, 2 * np.pi),
            "tex_freq": np.float32(srng.uniform(2.0, 5.0)),
            "tex_orient": np.float32(orient + srng.normal(0, 0.12)),
            "tex_amp": np.float32(srng.uniform(0.12, 0.25)),
        })

    irng = _rng(_TAG_IMAGES, seed, c)
    f32 = np.float32
    centre_jit = irng.normal(0, 0.12, size=(n, 2)).astype(f32)
    radius_jit = np.exp(irng.normal(0, 0.1, size=n)).astype(f32)
    fg_jit = irng.normal(0, 0.04, size=(n, 3)).astype(f32)
    bg_jit = irng.normal(0, 0.04, size=(n, 3)).astype(f32)
    phase = irng.uniform(0, 2 * np.pi, size=n).astype(f32)
    noise = irng.standard_normal(size=out.shape, dtype=f32)

    coords = (np.arange(size, dtype=f32) + f32(0.5)) * f32(2.0 / size) - f32(1.0)
    yy, xx = coords[:, None], coords[None, :]
    # Images come in contiguous per-style blocks (balanced); the caller's shuffle hides the order.
    bounds = np.cumsum([0] + [n // styles + (s < n % styles) for s in range(styles)])
    for s, st in enumerate(style_params):
        sl = slice(bounds[s], bounds[s + 1])
        if sl.start == sl.stop:
            continue
        ctr = np.clip(st["centre"] + centre_jit[sl], -0.45, 0.45)
        cx, cy = ctr[:, 0, None, None], ctr[:, 1, None, None]
        r = (st["radius"] * radius_jit[sl])[:, None, None]
        mask = _shape_mask(st["shape"], xx - cx, yy - cy, r, st, 2.0 / size).astype(f32)[:, None]
        wave = np.cos(st["tex_orient"]) * xx + np.sin(st["tex_orient"]) * yy  # (size, size)
        tex = f32(1.0) + st["tex_amp"] * np.sin(f32(np.pi) * st["tex_freq"] * wave + phase[sl, None, None])
        bg = (st["bg"] + bg_jit[sl])[:, :, None, None]
        block = out[sl]  # composite in place: bg + (fg * texture - bg) * mask
        np.multiply((st["fg"] + fg_jit[sl])[:, :, None, None], tex[:, None], out=block)
        block -= bg
        block *= mask
        block += bg
    noise *= f32(0.02)
    out += noise
    np.clip(out, 0.0, 1.0, out=out)


def make_synthetic(
    n_per_class: int, *, num_classes: int = 10, styles_per_class: int = 3, seed: int = 0, size: int = 32
) -> Dataset:
    """A CIFAR-shaped pool of any size, for scale tests that must not depend on downloads.

    Each class is a mixture of `styles_per_class` visibly different modes (shape, background lightness,
    texture) sharing a class hue and texture orientation, so classes are learnable yet multi-modal.
    Each class draws from its own (seed, class) streams, so its images never depend on what other classes
    drew, and the same arguments always give byte-identical arrays.
    """
    for name, value, low in (("n_per_class", n_per_class, 1), ("num_classes", num_classes, 1),
                             ("styles_per_class", styles_per_class, 1), ("seed", seed, 0), ("size", size, 8)):
        if int(value) != value or value < low:
            raise ValueError(f"make_synthetic: {name} must be an integer >= {low}, got {value!r}")
    n, num_classes, styles, seed, size = map(int, (n_per_class, num_classes, styles_per_class, seed, size))
    images = np.empty((num_classes * n, 3, size, size), dtype=np.float32)
    for c in range(num_classes):
        _class_images(images[c * n:(c + 1) * n], c, num_classes, styles, seed)
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), n)
    order = _rng(_TAG_SHUFFLE, seed, num_classes, n).permutation(len(labels))
    return validate_dataset(
        images[order], labels[order], source="synthetic", num_classes=num_classes, min_per_class=1
    )


# -------------------------------------------------------------------------------------------- CIFAR-10

_CIFAR_DIR = "cifar-10-batches-py"
_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_BATCH = "test_batch"


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 protocol-2 pickles spell `bytes` as `_codecs.encode(str, "latin1")`; allow only that use.
    if not isinstance(text, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode only allowed for latin1 text, got {encoding!r}")
    return text.encode("latin1")


@functools.lru_cache(maxsize=1)
def _allowed_globals() -> dict[tuple[str, str], object]:
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                              ("_codecs", "encode"): _latin1_encode}
    for pkg in ("numpy.core", "numpy._core"):  # pickles name whichever module the writer's numpy had
        allowed[(f"{pkg}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{pkg}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{pkg}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5 arrays
    return allowed


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; a downloaded pickle may run code, so only numpy's array builders load."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str):
        found = _allowed_globals().get((module, name))
        if found is None:
            raise DatasetError(self._path, "<file>",
                               f"recon refuses to unpickle {module}.{name}: a CIFAR-10 batch holds only "
                               "numpy arrays, lists and bytes")
        return found


def _field(raw: dict, key: str):
    for k in (key.encode(), key):
        if k in raw:
            return raw[k]
    raise KeyError(key)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as fh:
            raw = _NumpyOnlyUnpickler(fh, path).load()
    except DatasetError:
        raise
    except Exception as e:
        problem = f"is not a readable CIFAR-10 python batch ({type(e).__name__}: {e})"
        raise DatasetError(path, "<file>", problem) from e
    if not isinstance(raw, dict):
        raise DatasetError(path, "<file>", f"expected a pickled dict, got {type(raw).__name__}")
    found = sorted(k.decode("latin1") if isinstance(k, bytes) else str(k) for k in raw)
    try:
        data, labels = _field(raw, "data"), _field(raw, "labels")
    except KeyError as e:
        raise DatasetError(path, e.args[0], f"missing key (found keys: {found})") from None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        is_array = isinstance(data, np.ndarray)
        desc = f"{data.dtype} array of shape {data.shape}" if is_array else type(data).__name__
        raise DatasetError(path, "data", f"expected a uint8 array of shape (N, 3072), got {desc}")
    try:
        labs = np.asarray(labels)
    except Exception as e:
        raise DatasetError(path, "labels", f"is not a list of integers ({e})") from e
    if labs.ndim != 1 or len(labs) != len(data) or (len(labs) and not np.issubdtype(labs.dtype, np.integer)):
        problem = f"expected {len(data)} integers, got {labs.dtype} of shape {labs.shape}"
        raise DatasetError(path, "labels", problem)
    if len(labs) and (labs.min() < 0 or labs.max() > 9):
        raise DatasetError(path, "labels", f"must lie in 0..9, got min {labs.min()}, max {labs.max()}")
    return data, labs.astype(np.int64)


def load_cifar10(root: str | os.PathLike, *, split: str = "train") -> Dataset:
    """Use a CIFAR-10 copy already on disk (the official python batches) without trusting its pickles.

    `root` is the `cifar-10-batches-py` directory or its parent. Missing train batches are tolerated
    (partial copies are handy in tests), but at least one must exist; "all" is train followed by test.
    """
    splits = {"train": _TRAIN_BATCHES, "test": (_TEST_BATCH,), "all": (*_TRAIN_BATCHES, _TEST_BATCH)}
    if split not in splits:
        raise ValueError(f"load_cifar10: split must be one of {sorted(splits)}, got {split!r}")
    root = Path(root)
    directory = root / _CIFAR_DIR if (root / _CIFAR_DIR).is_dir() else root
    if not directory.is_dir():
        raise DatasetError(root, "<dir>", f"not found (expected the '{_CIFAR_DIR}' directory or its parent)")

    names = [n for n in splits[split] if (directory / n).is_file()]
    if split in ("train", "all") and not any(n in _TRAIN_BATCHES for n in names):
        looked = ", ".join(_TRAIN_BATCHES)
        raise DatasetError(directory, "<dir>", f"has no CIFAR-10 train batch (looked for {looked})")
    if split in ("test", "all") and _TEST_BATCH not in names:
        raise DatasetError(directory, "<dir>", f"has no CIFAR-10 test batch (looked for {_TEST_BATCH})")

    parts = [_read_cifar_batch(directory / n) for n in names]
    data = np.concatenate([d for d, _ in parts])
    images = data.reshape(-1, 3, 32, 32).astype(np.float32)
    images /= np.float32(255.0)
    labels = np.concatenate([lab for _, lab in parts])
    return validate_dataset(images, labels, source=directory)


# ---------------------------------------------------------------------------------------------- dispatch

_POOLS = {"digits": load_digits_pool, "synthetic": make_synthetic, "cifar10": load_cifar10}


def load_pool(name: str, **kwargs) -> Dataset:
    """One entry point so configs can name a pool as a string."""
    try:
        loader = _POOLS[name]
    except KeyError:
        raise ValueError(f"unknown pool {name!r}; valid names: {', '.join(sorted(_POOLS))}") from None
    return loader(**kwargs)
