"""Deterministic synthetic whole-slide images with known ground truth.

Writes pyramidal, JPEG-tiled TIFF files that OpenSlide opens (``aperio`` or
``generic-tiff`` vendor) and that contain H&E-like tissue regions whose class,
shape and position are known exactly. Used by tests, demos, benchmarks and
training recipes.

Textures live in physical units: each class has a seeded, seamlessly periodic
texture bank of 512 x 512 px at 0.5 um/px (period 256 um). A pixel is rendered
by sampling the bank at (its centre in um) mod period, resampled (area average
or linear) to the output pixel size, so the same location looks the same in
every tile and level. A slow, seeded stain-intensity field (period 2048 um)
breaks the exact repetition. Slides are written tile by tile, so memory stays
bounded whatever the slide size.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import cv2
import numpy as np
import tifffile

from pathchat.utils.atomic import atomic_path

TISSUE_CLASSES: tuple[str, ...] = ("tumor", "stroma", "lymphocytes", "fat", "necrosis", "mucin", "faint")
BACKGROUND_RGB: tuple[int, int, int] = (242, 242, 240)

_BANK_PX = 512  # texture bank size at its native resolution
_BANK_MPP = 0.5  # native resolution of the banks (um/px)
_PERIOD_UM = _BANK_PX * _BANK_MPP  # 256 um
_MOD_CELLS, _MOD_CELL_UM = 256, 8.0  # stain-intensity field: 256 cells of 8 um (period 2048 um)
_MOD_AMPLITUDE = 0.04
_APERIO_HEADER = "Aperio Image Library v12.0.15"
_SOFTWARE = "pathchat.wsi.synthetic"


@dataclass(frozen=True)
class TissueRegion:
    tissue_class: str  # one of TISSUE_CLASSES
    x_um: float  # top-left of the bounding box, um from the slide's top-left corner
    y_um: float
    width_um: float
    height_um: float
    shape: str = "rect"  # "rect" or "ellipse" (inscribed in the box)

    def __post_init__(self) -> None:
        if self.tissue_class not in TISSUE_CLASSES:
            raise ValueError(f"unknown tissue class {self.tissue_class!r}; expected one of {TISSUE_CLASSES}")
        if self.shape not in ("rect", "ellipse"):
            raise ValueError(f"shape must be 'rect' or 'ellipse', not {self.shape!r}")
        if not (self.width_um > 0 and self.height_um > 0):
            raise ValueError("region width_um and height_um must be positive")


@dataclass(frozen=True)
class SyntheticSlideSpec:
    width_px: int  # level-0 size
    height_px: int
    mpp: float = 0.5  # level-0 um per pixel
    regions: tuple[TissueRegion, ...] = ()  # later regions paint over earlier ones
    downsamples: tuple[int, ...] = (1, 4, 16)  # first must be 1; levels below 1 px are dropped
    vendor: str = "aperio"  # "aperio" or "generic-tiff"
    write_mpp: bool = True  # False: no MPP/AppMag and no TIFF resolution tags
    objective_power: float | None = None  # None -> round(10 / mpp)
    tile_px: int = 256  # multiple of 16
    jpeg_quality: int = 90
    seed: int = 0
    label_text: str = "PATHCHAT-SYNTH"
    private_marker: str | None = None  # planted in descriptions, free-text tags and the label (privacy tests)

    def __post_init__(self) -> None:
        if self.width_px < 1 or self.height_px < 1 or not self.mpp > 0:
            raise ValueError("width_px, height_px and mpp must be positive")
        ds = tuple(self.downsamples)
        if not ds or ds[0] != 1 or any(int(d) != d or d < 1 for d in ds) or list(ds) != sorted(set(ds)):
            raise ValueError(f"downsamples must be increasing integers starting with 1, got {ds}")
        if self.vendor not in ("aperio", "generic-tiff"):
            raise ValueError(f"vendor must be 'aperio' or 'generic-tiff', not {self.vendor!r}")
        if self.tile_px < 16 or self.tile_px % 16:
            raise ValueError("tile_px must be a positive multiple of 16")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError("jpeg_quality must be in 1..100")
        object.__setattr__(self, "regions", tuple(self.regions))
        object.__setattr__(self, "downsamples", tuple(int(d) for d in ds))

    def levels(self) -> list[tuple[int, int, int]]:
        """(downsample, width, height) of each written level: ceil(W / d) x ceil(H / d)."""
        return [
            (d, math.ceil(self.width_px / d), math.ceil(self.height_px / d))
            for d in self.downsamples
            if self.width_px / d >= 1 and self.height_px / d >= 1
        ]

    def magnification(self) -> float:
        return self.objective_power if self.objective_power is not None else float(round(10 / self.mpp))


# ----------------------------------------------------------------------------- geometry


def _region_block(r: TissueRegion, xs_um: np.ndarray, ys_um: np.ndarray):
    """Rows/cols slice of sorted sample coordinates inside ``r``'s box, plus an ellipse mask (or None)."""
    j0, j1 = np.searchsorted(xs_um, [r.x_um, r.x_um + r.width_um], side="left")
    i0, i1 = np.searchsorted(ys_um, [r.y_um, r.y_um + r.height_um], side="left")
    if j0 >= j1 or i0 >= i1:
        return None
    mask = None
    if r.shape == "ellipse":
        u = (xs_um[j0:j1] - (r.x_um + r.width_um / 2)) / (r.width_um / 2)
        v = (ys_um[i0:i1] - (r.y_um + r.height_um / 2)) / (r.height_um / 2)
        mask = u[None, :] ** 2 + v[:, None] ** 2 <= 1.0
    return slice(i0, i1), slice(j0, j1), mask


def class_map(
    spec: SyntheticSlideSpec, l0_x: float, l0_y: float, width: int, height: int, downsample: float = 1.0
) -> np.ndarray:
    """int16 [height, width] class index (-1 = background); pixel (i, j) samples level-0 point
    (l0_x + (j + 0.5) * downsample, l0_y + (i + 0.5) * downsample)."""
    d = float(downsample)
    xs_um = (l0_x + (np.arange(width) + 0.5) * d) * spec.mpp
    ys_um = (l0_y + (np.arange(height) + 0.5) * d) * spec.mpp
    out = np.full((height, width), -1, dtype=np.int16)
    for r in spec.regions:
        block = _region_block(r, xs_um, ys_um)
        if block is None:
            continue
        rows, cols, mask = block
        if mask is None:
            out[rows, cols] = TISSUE_CLASSES.index(r.tissue_class)
        else:
            out[rows, cols][mask] = TISSUE_CLASSES.index(r.tissue_class)
    return out


def tissue_area_um2(spec: SyntheticSlideSpec, samples: int = 1024) -> dict[str, float]:
    """Painted area per class in um^2 (inside the slide, after overlaps). Each region's box (clipped to
    the slide) is sampled on a ``samples`` x ``samples`` midpoint grid; a sample counts for the region
    if it is inside it and no later region covers it. Exact for unoverlapped rects."""
    areas = {c: 0.0 for c in TISSUE_CLASSES}
    w_um, h_um = spec.width_px * spec.mpp, spec.height_px * spec.mpp
    for k, r in enumerate(spec.regions):
        x0, x1 = max(r.x_um, 0.0), min(r.x_um + r.width_um, w_um)
        y0, y1 = max(r.y_um, 0.0), min(r.y_um + r.height_um, h_um)
        if x0 >= x1 or y0 >= y1:
            continue
        xs = x0 + (np.arange(samples) + 0.5) * (x1 - x0) / samples
        ys = y0 + (np.arange(samples) + 0.5) * (y1 - y0) / samples
        hit = np.zeros((samples, samples), dtype=bool)
        for n, other in enumerate(spec.regions[k:]):
            block = _region_block(other, xs, ys)
            if block is None:
                continue
            rows, cols, mask = block
            value = n == 0  # own region paints True, later ones erase
            if mask is None:
                hit[rows, cols] = value
            else:
                hit[rows, cols][mask] = value
        areas[r.tissue_class] += float(hit.mean()) * (x1 - x0) * (y1 - y0)
    return areas


# ----------------------------------------------------------------------------- textures


def _periodic_noise(
    rng: np.random.Generator, n: int, sigma: float, sigma_across: float | None = None, angle: float = 0.0
) -> np.ndarray:
    """Seamlessly tileable Gaussian-filtered noise (FFT), zero mean, unit std; optionally anisotropic."""
    f = np.fft.fftfreq(n)
    fx, fy = np.meshgrid(f, f)
    fa = fx * math.cos(angle) + fy * math.sin(angle)
    fc = -fx * math.sin(angle) + fy * math.cos(angle)
    sc = sigma if sigma_across is None else sigma_across
    kernel = np.exp(-2 * math.pi**2 * (sigma**2 * fa**2 + sc**2 * fc**2))
    field = np.fft.ifft2(np.fft.fft2(rng.standard_normal((n, n))) * kernel).real
    return ((field - field.mean()) / (field.std() + 1e-12)).astype(np.float32)


def _blobs(
    rng: np.random.Generator,
    n: int,
    count: int,
    radius: tuple[float, float],
    elongation: tuple[float, float] = (1.0, 1.3),
    angle: float | None = None,
) -> np.ndarray:
    """Float mask [n, n] in 0..1 of ``count`` filled anti-aliased ellipses, wrapped around the edges."""
    canvas = np.zeros((n, n), np.uint8)
    for _ in range(count):
        cx, cy = rng.uniform(0, n, 2)
        a = rng.uniform(*radius)
        b = a / rng.uniform(*elongation)
        theta = math.degrees(angle + rng.normal(0, 0.15)) if angle is not None else rng.uniform(0, 180)
        for dx in (-n, 0, n):
            for dy in (-n, 0, n):
                if -a <= cx + dx < n + a and -a <= cy + dy < n + a:
                    centre = (int(round(cx + dx)), int(round(cy + dy)))
                    axes = (max(1, int(round(a))), max(1, int(round(b))))
                    cv2.ellipse(canvas, centre, axes, theta, 0, 360, 255, -1, cv2.LINE_AA)
    return canvas.astype(np.float32) / 255.0


def _mix(base: np.ndarray, colour, alpha: np.ndarray) -> np.ndarray:
    a = np.clip(alpha, 0, 1)[..., None]
    return base * (1 - a) + np.asarray(colour, np.float32) * a


def _flat(colour, n: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(colour, np.float32), (n, n, 3)).copy()


def _make_texture(name: str, seed: int) -> np.ndarray:
    """uint8 [512, 512, 3] seamless texture of a class (or 'background') at 0.5 um/px."""
    key = -1 if name == "background" else TISSUE_CLASSES.index(name)
    rng = np.random.default_rng([seed, key + 1, 20240611])
    n = _BANK_PX
    grain = _periodic_noise(rng, n, 1.0)[..., None]
    if name == "background":  # luminance-only noise: saturation stays ~2 on the 0..255 scale
        img = _flat(BACKGROUND_RGB, n) + 0.8 * grain
    elif name == "tumor":  # dense, large, pleomorphic dark-purple nuclei on pink
        img = _flat((232, 168, 198), n) + 6 * _periodic_noise(rng, n, 4.0)[..., None]
        nuclei = _blobs(rng, n, 190, (9, 15), (1.0, 1.6))
        chromatin = (92, 48, 128) + 18 * _periodic_noise(rng, n, 1.5)[..., None]
        img = img * (1 - nuclei[..., None]) + chromatin * nuclei[..., None]
        img = _mix(img, (60, 25, 95), 0.5 * _blobs(rng, n, 140, (1.5, 3)) * nuclei)  # nucleoli
    elif name == "stroma":  # pink with oriented fibre streaks, sparse elongated nuclei
        angle = rng.uniform(0, math.pi)
        fibres = _periodic_noise(rng, n, 40.0, 1.2, angle)[..., None]
        img = _flat((236, 155, 183), n) + fibres * (10, 22, 14) + 3 * grain
        img = _mix(img, (110, 55, 140), 0.9 * _blobs(rng, n, 22, (8, 12), (3.5, 5.0), angle))
    elif name == "lymphocytes":  # dense small round dark-blue dots
        img = _flat((210, 188, 226), n) + 4 * _periodic_noise(rng, n, 3.0)[..., None]
        img = _mix(img, (42, 44, 140), 0.95 * _blobs(rng, n, 1700, (3.0, 4.2), (1.0, 1.15)))
    elif name == "fat":  # white polygons with thin pink walls (periodic Voronoi)
        seeds = rng.uniform(0, n, (12, 2))
        tiled = np.concatenate([seeds + (dx, dy) for dx in (-n, 0, n) for dy in (-n, 0, n)])
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
        d1 = np.full((n, n), np.inf, np.float32)  # nearest and second-nearest seed distance
        d2 = d1.copy()
        for sx, sy in tiled:
            dist = np.hypot(xx - sx, yy - sy)
            d2 = np.minimum(d2, np.maximum(d1, dist))
            d1 = np.minimum(d1, dist)
        wall = np.clip(2.5 - (d2 - d1), 0, 1.0)
        img = _mix(_flat((250, 248, 248), n) + 1.0 * grain, (224, 148, 178), wall)
    elif name == "necrosis":  # pale pink-grey, granular, with karyorrhectic debris
        img = _flat((214, 184, 194), n) + 12 * grain + 6 * _periodic_noise(rng, n, 6.0)[..., None]
        img = _mix(img, (140, 100, 140), 0.8 * _blobs(rng, n, 400, (1.0, 2.2), (1.0, 2.0)))
    elif name == "mucin":  # pale blue-grey, wispy
        wisps = _periodic_noise(rng, n, 18.0, 3.0, rng.uniform(0, math.pi))[..., None]
        img = _flat((196, 205, 222), n) + wisps * (14, 12, 7) + 2 * grain
    elif name == "faint":  # very pale, low-saturation pink (HSV S ~ 25-30 of 255)
        img = _flat((238, 214, 227), n) + 2.5 * _periodic_noise(rng, n, 3.0)[..., None]
        img = _mix(img, (222, 200, 224), 0.6 * _blobs(rng, n, 60, (5, 8)))
    else:
        raise ValueError(name)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


@lru_cache(maxsize=128)
def _texture(name: str, seed: int, size: int) -> np.ndarray:
    bank = _texture0(name, seed)
    if size == _BANK_PX:
        return bank
    interp = cv2.INTER_AREA if size < _BANK_PX else cv2.INTER_LINEAR
    out = cv2.resize(bank, (size, size), interpolation=interp)
    out.flags.writeable = False
    return out


@lru_cache(maxsize=32)
def _texture0(name: str, seed: int) -> np.ndarray:
    bank = _make_texture(name, seed)
    bank.flags.writeable = False
    return bank


@lru_cache(maxsize=8)
def _stain_field(seed: int) -> np.ndarray:
    field = np.clip(_periodic_noise(np.random.default_rng([seed, 99]), _MOD_CELLS, 12.0), -2.5, 2.5)
    field = (1.0 + _MOD_AMPLITUDE * field).astype(np.float32)
    field.flags.writeable = False
    return field


def render_region(
    spec: SyntheticSlideSpec, l0_x: float, l0_y: float, width: int, height: int, downsample: float = 1.0
) -> np.ndarray:
    """uint8 RGB [height, width, 3]: the exact (pre-JPEG) pixels of that region at that downsample."""
    d = float(downsample)
    cmap = class_map(spec, l0_x, l0_y, width, height, d)
    xs_um = (l0_x + (np.arange(width) + 0.5) * d) * spec.mpp
    ys_um = (l0_y + (np.arange(height) + 0.5) * d) * spec.mpp
    size = max(1, round(_BANK_PX * _BANK_MPP / (spec.mpp * d)))  # bank px at this output resolution
    ix = np.minimum((np.mod(xs_um, _PERIOD_UM) * (size / _PERIOD_UM)).astype(np.intp), size - 1)[None, :]
    iy = np.minimum((np.mod(ys_um, _PERIOD_UM) * (size / _PERIOD_UM)).astype(np.intp), size - 1)[:, None]

    out = _texture("background", spec.seed, size)[iy, ix]
    counts = np.bincount(cmap.ravel() + 1, minlength=len(TISSUE_CLASSES) + 1)
    if counts[0] == cmap.size:
        return out
    for c in np.flatnonzero(counts[1:]):
        tex = _texture(TISSUE_CLASSES[c], spec.seed, size)[iy, ix]
        if counts[c + 1] == cmap.size:
            out = tex
        else:
            np.copyto(out, tex, where=(cmap == c)[..., None])
    period = _MOD_CELLS * _MOD_CELL_UM
    mx = (np.mod(xs_um, period) / _MOD_CELL_UM).astype(np.intp)[None, :] % _MOD_CELLS
    my = (np.mod(ys_um, period) / _MOD_CELL_UM).astype(np.intp)[:, None] % _MOD_CELLS
    gain = _stain_field(spec.seed)[my, mx][..., None]
    shaded = np.clip(out * gain + 0.5, 0, 255).astype(np.uint8)
    np.copyto(out, shaded, where=(cmap >= 0)[..., None])
    return out


# ----------------------------------------------------------------------------- writer


def _level_tiles(
    spec: SyntheticSlideSpec, d: int, width: int, height: int, pool: ThreadPoolExecutor, batch: int = 32
) -> Iterator[np.ndarray]:
    """Full tiles of one level in row-major order, rendered ``batch`` at a time on ``pool``."""
    t = spec.tile_px
    coords = [(ty * t, tx * t) for ty in range(math.ceil(height / t)) for tx in range(math.ceil(width / t))]
    for k in range(0, len(coords), batch):
        yield from pool.map(
            lambda yx: render_region(spec, yx[1] * d, yx[0] * d, t, t, d), coords[k : k + batch]
        )


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii")


def _label_image(spec: SyntheticSlideSpec, width: int = 400, height: int = 320) -> np.ndarray:
    img = np.full((height, width, 3), 255, np.uint8)
    lines = [spec.label_text, f"seed {spec.seed}"] + ([spec.private_marker] if spec.private_marker else [])
    for k, line in enumerate(lines):
        cv2.putText(
            img, _ascii(line), (16, 40 + 36 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (0, 0, 0), 2, cv2.LINE_AA
        )
    bars = np.random.default_rng([spec.seed, 7]).integers(0, 2, 90).astype(bool)  # fake barcode
    for b in np.flatnonzero(bars):
        img[height - 100 : height - 20, 20 + 4 * b : 22 + 4 * b] = 0
    return img


def _thumbnail(spec: SyntheticSlideSpec, max_px: int) -> np.ndarray:
    d = max(1.0, max(spec.width_px, spec.height_px) / max_px)
    w, h = max(1, round(spec.width_px / d)), max(1, round(spec.height_px / d))
    return render_region(spec, 0, 0, w, h, d)


def _macro_image(spec: SyntheticSlideSpec, label: np.ndarray, height: int = 400) -> np.ndarray:
    lab = cv2.resize(
        label, (round(label.shape[1] * height / label.shape[0]), height), interpolation=cv2.INTER_AREA
    )
    glass = np.full((height, 3 * height, 3), BACKGROUND_RGB, np.uint8)
    thumb = _thumbnail(spec, height - 40)
    y0, x0 = (height - thumb.shape[0]) // 2, (glass.shape[1] - thumb.shape[1]) // 2
    glass[y0 : y0 + thumb.shape[0], x0 : x0 + thumb.shape[1]] = thumb
    return np.ascontiguousarray(np.concatenate([lab, glass], axis=1))


def _fmt(x: float) -> str:
    return f"{x:g}" if float(x).is_integer() else repr(float(x))


def _aperio_description(spec: SyntheticSlideSpec, size: tuple[int, int] | None = None) -> str:
    """Level description; ``size`` (w, h) given for reduced levels / thumbnail ("-> wxh")."""
    W, H, t = spec.width_px, spec.height_px, spec.tile_px
    head = f"{_APERIO_HEADER} \r\n{W}x{H} [0,0 {W}x{H}] ({t}x{t})"
    if size is not None:
        head += f" -> {size[0]}x{size[1]}"
    fields = [f"{head} JPEG/RGB Q={spec.jpeg_quality}"]
    if spec.write_mpp:
        fields += [f"AppMag = {_fmt(spec.magnification())}", f"MPP = {_fmt(spec.mpp)}"]
    fields += ["ScanScope ID = SYNTH-0001", f"Filename = {spec.private_marker or 'synthetic'}"]
    if spec.private_marker:
        fields.append(f"Patient = {spec.private_marker}")
    return "|".join(fields)


def write_synthetic_slide(path: str | os.PathLike, spec: SyntheticSlideSpec) -> pathlib.Path:
    """Write the slide atomically (`pathchat.utils.atomic.atomic_path`: a temporary beside it, renamed into
    place). Returns the path."""
    path = pathlib.Path(path)
    levels = spec.levels()
    raw_bytes = sum(w * h * 3 for _, w, h in levels)
    marker = spec.private_marker
    common: dict[str, Any] = dict(
        photometric="rgb", metadata=None, software=f"{_SOFTWARE} {marker}" if marker else _SOFTWARE
    )
    if marker:  # Artist, DocumentName
        common["extratags"] = [(315, "s", 0, marker, False), (269, "s", 0, marker, False)]
    if spec.write_mpp:
        px_per_cm = 10000.0 / spec.mpp
        common.update(resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER")
    jpeg: dict[str, Any] = dict(compression="jpeg", compressionargs={"level": spec.jpeg_quality})
    tiled: dict[str, Any] = dict(tile=(spec.tile_px, spec.tile_px), dtype=np.uint8, **jpeg, **common)

    with (
        atomic_path(path) as tmp,  # a temporary in the target folder, fsynced and renamed on success
        tifffile.TiffWriter(tmp, bigtiff=raw_bytes > 3_500_000_000) as tif,
        ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool,
    ):
        for k, (d, w, h) in enumerate(levels):
            if spec.vendor == "aperio":
                desc = _aperio_description(spec, None if k == 0 else (w, h))
            else:
                desc = f"pathchat synthetic slide level {k} downsample {d}"
                if marker:
                    desc += f"|Patient = {marker}"
            # SubfileType "reduced image" on levels > 0: OpenSlide's generic-tiff skips them otherwise
            tif.write(
                _level_tiles(spec, d, w, h, pool),
                shape=(h, w, 3),
                description=desc,
                subfiletype=0 if k == 0 else 1,
                **tiled,
            )
            if k == 0 and spec.vendor == "aperio":  # 2nd directory, stripped: OpenSlide's "thumbnail"
                thumb = _thumbnail(spec, 1024)
                desc = _aperio_description(spec, (thumb.shape[1], thumb.shape[0]))
                tif.write(thumb, description=desc, **jpeg, **common)
        if spec.vendor == "aperio":
            label = _label_image(spec)
            macro = _macro_image(spec, label)
            comps: list[tuple[str, np.ndarray, dict[str, Any]]] = [
                ("label", label, {"compression": "lzw"}),
                ("macro", macro, jpeg),
            ]
            for name, img, comp in comps:
                desc = f"{_APERIO_HEADER}\r\n{name} {img.shape[1]}x{img.shape[0]}"
                if marker:
                    desc += f"|Patient = {marker}"
                tif.write(
                    img, description=desc, subfiletype=1 if name == "label" else 9, **comp, **common
                )
    return path


def random_slide_spec(
    seed: int,
    width_px: int = 4096,
    height_px: int = 4096,
    mpp: float = 0.5,
    n_regions: int | tuple[int, int] = (1, 4),
    classes=None,
    **spec_kwargs,
) -> SyntheticSlideSpec:
    """Seeded random layout of non-overlapping regions (random class, rect/ellipse, 12-45% of each side).
    ``seed`` also becomes the spec's texture seed; ``spec_kwargs`` go to SyntheticSlideSpec. Fewer regions
    than drawn are returned if they do not fit after 200 tries each."""
    rng = np.random.default_rng([seed, 31337])
    classes = tuple(classes) if classes is not None else TISSUE_CLASSES
    lo, hi = (n_regions, n_regions) if isinstance(n_regions, int) else n_regions
    target = int(rng.integers(lo, hi + 1))
    w_um, h_um = width_px * mpp, height_px * mpp
    gap = 0.02 * min(w_um, h_um)
    regions: list[TissueRegion] = []
    for _ in range(200 * max(target, 1)):
        if len(regions) >= target:
            break
        rw, rh = rng.uniform(0.12, 0.45) * w_um, rng.uniform(0.12, 0.45) * h_um
        x, y = rng.uniform(0, w_um - rw), rng.uniform(0, h_um - rh)
        if all(
            x + rw + gap <= r.x_um
            or r.x_um + r.width_um + gap <= x
            or y + rh + gap <= r.y_um
            or r.y_um + r.height_um + gap <= y
            for r in regions
        ):
            regions.append(
                TissueRegion(
                    str(rng.choice(classes)),
                    round(x, 1),
                    round(y, 1),
                    round(rw, 1),
                    round(rh, 1),
                    "ellipse" if rng.random() < 0.5 else "rect",
                )
            )
    return SyntheticSlideSpec(width_px, height_px, mpp, regions=tuple(regions), seed=seed, **spec_kwargs)
