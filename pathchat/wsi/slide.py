"""One small slide interface over OpenSlide files and in-memory images.

Coordinates prefixed `l0_` are level-0 pixels; `level` indexes the pyramid. Reads return RGB uint8
`[h, w, 3]`, so no caller ever sees alpha: unscanned (transparent) areas and pixels past the slide edge
are composited on white, or, with `edge_pixels="black"`, the alpha is dropped as TRIDENT and CLAM do
(PIL's `convert("RGB")`: OpenSlide's fully transparent pixels are black).
Every read size is checked before allocation, and an OpenSlide handle that raised once is reopened
before the next read (OpenSlide keeps a handle in an error state forever).
Only an allow-list of metadata (`SlideInfo`) leaves this module: label and macro images and raw
description text can carry patient identifiers, so they are never exposed.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pathchat.wsi.errors import (
    CorruptSlideError,
    MissingResolutionError,
    SlideError,
    SlideTooLargeError,
    UnsupportedFormatError,
)
from pathchat.wsi.tiff_direct import DirectDecodeError, DirectTiffLevels

#: Largest region one read may allocate (pixels). 2**28 px is 1 GiB of RGBA.
DEFAULT_MAX_READ_PIXELS = 1 << 28
#: Slides claiming more level-0 pixels than this (1M x 1M) are refused as corrupt or hostile.
DEFAULT_MAX_SLIDE_PIXELS = 1 << 40
#: Plain images (PNG/JPEG) are decoded whole; refuse anything larger than this.
DEFAULT_MAX_IMAGE_PIXELS = 1 << 30
#: How `read_region` renders transparent pixels: composited on white, or the alpha dropped (black).
EDGE_PIXEL_MODES = ("white", "black")
#: Thumbnails are assembled from chunks of at most this many level pixels per side.
_THUMBNAIL_CHUNK_PX = 4096

PLAIN_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"})


@dataclass(frozen=True)
class SlideInfo:
    """The allow-listed slide metadata that may go into outputs (no label, macro or raw text)."""

    width: int
    height: int
    level_count: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None  # level-0 µm per pixel as written in the file, if any
    objective_power: float | None
    vendor: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["level_dimensions"] = [list(dims) for dims in self.level_dimensions]
        d["level_downsamples"] = list(self.level_downsamples)
        return d


class Slide(ABC):
    """A pyramidal RGB image with physical resolution metadata.

    Subclasses provide `_read` (the raw region read) and set the metadata attributes; size checks,
    thumbnails and resolution logic live here once.
    """

    def __init__(self, path: str | os.PathLike[str], max_read_pixels: int = DEFAULT_MAX_READ_PIXELS):
        self.path = os.fspath(path)
        self.max_read_pixels = max_read_pixels

    # -- metadata (subclasses set these attributes in their constructors) ---------------------
    _level_dimensions: tuple[tuple[int, int], ...]
    _level_downsamples: tuple[float, ...]
    _mpp: float | None
    _objective_power: float | None
    _vendor: str

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._level_downsamples

    @property
    def mpp(self) -> float | None:
        """Level-0 µm per pixel from the file's metadata (None when absent)."""
        return self._mpp

    @property
    def objective_power(self) -> float | None:
        return self._objective_power

    @property
    def vendor(self) -> str:
        return self._vendor

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def info(self) -> SlideInfo:
        return SlideInfo(
            width=self.dimensions[0],
            height=self.dimensions[1],
            level_count=self.level_count,
            level_dimensions=tuple(self.level_dimensions),
            level_downsamples=tuple(float(d) for d in self.level_downsamples),
            mpp=self.mpp,
            objective_power=self.objective_power,
            vendor=self.vendor,
        )

    def best_level_for_downsample(self, downsample: float) -> int:
        """Coarsest level whose downsample is at most `downsample` (never a coarser one)."""
        best = 0
        for level, d in enumerate(self.level_downsamples):
            if d <= downsample * (1 + 1e-3):
                best = level
        return best

    # -- pixels -----------------------------------------------------------------------------
    @abstractmethod
    def _read(self, l0_xy: tuple[int, int], level: int, size: tuple[int, int], edge_pixels: str) -> np.ndarray: ...

    def read_region(self, l0_xy: tuple[int, int], level: int, size: tuple[int, int],
                    edge_pixels: str = "white") -> np.ndarray:
        """Read `size` = (w, h) pixels of `level` whose top-left is the level-0 point `l0_xy`.

        Args:
            edge_pixels: "white" composites transparent pixels (outside the slide, unscanned) on white;
                "black" drops the alpha as TRIDENT and CLAM do, which makes them black.
        Returns:
            uint8 RGB `[h, w, 3]`.
        Raises:
            ValueError: bad level, non-positive size or unknown `edge_pixels`.
            SlideTooLargeError: w * h above `max_read_pixels`.
            CorruptSlideError: the backend could not decode the region.
        """
        if not 0 <= level < self.level_count:
            raise ValueError(f"{self.path}: level {level} out of range (slide has {self.level_count})")
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise ValueError(f"{self.path}: region size must be positive, got {w}x{h}")
        if edge_pixels not in EDGE_PIXEL_MODES:
            raise ValueError(f"{self.path}: edge_pixels must be one of {EDGE_PIXEL_MODES}, got {edge_pixels!r}")
        if w * h > self.max_read_pixels:
            raise SlideTooLargeError(
                self.path, f"a {w}x{h} read ({w * h:,} px) exceeds the limit of {self.max_read_pixels:,} px"
            )
        return self._read((int(l0_xy[0]), int(l0_xy[1])), level, (w, h), edge_pixels)

    def thumbnail(self, max_side: int = 1536) -> tuple[np.ndarray, float]:
        """A whole-slide overview whose long side is at most `max_side` pixels.

        Assembled chunk by chunk from the best level, so memory stays bounded even for a slide
        with no low-resolution level.

        Returns:
            (RGB uint8 `[h, w, 3]`, downsample from level 0 to the thumbnail).
        """
        l0_w, l0_h = self.dimensions
        downsample = max(1.0, max(l0_w, l0_h) / max_side)
        out_w, out_h = max(1, round(l0_w / downsample)), max(1, round(l0_h / downsample))
        level = self.best_level_for_downsample(downsample)
        level_ds = self.level_downsamples[level]
        lvl_w, lvl_h = self.level_dimensions[level]
        factor = downsample / level_ds  # level pixels per thumbnail pixel
        out = np.empty((out_h, out_w, 3), dtype=np.uint8)
        chunk_out = max(1, int(_THUMBNAIL_CHUNK_PX / factor))
        for oy in range(0, out_h, chunk_out):
            for ox in range(0, out_w, chunk_out):
                ow, oh = min(chunk_out, out_w - ox), min(chunk_out, out_h - oy)
                lx0, ly0 = round(ox * factor), round(oy * factor)
                lx1 = min(lvl_w, max(lx0 + 1, round((ox + ow) * factor)))
                ly1 = min(lvl_h, max(ly0 + 1, round((oy + oh) * factor)))
                try:
                    region = self.read_region(
                        (round(lx0 * level_ds), round(ly0 * level_ds)), level, (lx1 - lx0, ly1 - ly0)
                    )
                except CorruptSlideError as e:
                    bad = self._locate_corrupt(level, (lx0, ly0, lx1, ly1))
                    where = ", ".join(f"l0 ({x}, {y}) {w}x{h}" for x, y, w, h in bad[:5])
                    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
                    raise CorruptSlideError(
                        self.path, f"corrupt image data in {len(bad)} region(s) of level {level}: {where}{more} "
                        f"({e.cause.split(': ', 1)[-1]})"
                    ) from e
                if region.shape[:2] != (oh, ow):
                    region = cv2.resize(region, (ow, oh), interpolation=cv2.INTER_AREA)
                out[oy : oy + oh, ox : ox + ow] = region
        return out, l0_w / out_w

    def _locate_corrupt(self, level: int, box: tuple[int, int, int, int], cell: int = 512) -> list[tuple[int, int, int, int]]:
        """Level-0 (x, y, w, h) of the `cell`-px blocks of a level box that fail to decode."""
        ds = self.level_downsamples[level]
        bad = []
        for y in range(box[1], box[3], cell):
            for x in range(box[0], box[2], cell):
                w, h = min(cell, box[2] - x), min(cell, box[3] - y)
                try:
                    self.read_region((round(x * ds), round(y * ds)), level, (w, h))
                except CorruptSlideError:
                    bad.append((round(x * ds), round(y * ds), round(w * ds), round(h * ds)))
        return bad

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file handles (no-op for in-memory slides)."""

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, {self.dimensions[0]}x{self.dimensions[1]}, levels={self.level_count})"


def rgba_to_rgb(rgba: np.ndarray, edge_pixels: str = "white") -> np.ndarray:
    """(Non-premultiplied) RGBA to RGB: composited on white, or ("black") the alpha dropped as PIL's
    `convert("RGB")` does, which is what TRIDENT and CLAM feed their encoders."""
    if edge_pixels == "black":
        return np.ascontiguousarray(rgba[..., :3])
    return rgba_to_rgb_on_white(rgba)


def rgba_to_rgb_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite (non-premultiplied) RGBA on white; fast path when fully opaque."""
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha.astype(np.uint16)[..., None]
    rgb = (rgba[..., :3].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return rgb.astype(np.uint8)


def _parse_float(value: str | None) -> float | None:
    try:
        f = float(value) if value is not None else None
    except ValueError:
        return None
    return f if f is not None and np.isfinite(f) and f > 0 else None


class OpenSlideSlide(Slide):
    """Any format OpenSlide reads: SVS, NDPI, VMS, MRXS, SCN, BIF, Philips/generic TIFF, DICOM.

    JPEG-tiled TIFF-family levels (Aperio, generic TIFF) are decoded directly when `direct_decode`
    is true and OpenSlide agrees pixel for pixel on a check tile (`pathchat.wsi.tiff_direct`);
    everything else goes through OpenSlide's `read_region`.
    """

    def __init__(self, path: str | os.PathLike[str], max_read_pixels: int = DEFAULT_MAX_READ_PIXELS,
                 direct_decode: bool = True):
        super().__init__(path, max_read_pixels)
        self._direct_decode = direct_decode
        self._direct: DirectTiffLevels | None = None
        self._direct_checked = False
        self._open_target = _openslide_target(Path(self.path))
        self._osr = self._open()
        props = self._osr.properties
        self._level_dimensions = tuple((int(w), int(h)) for w, h in self._osr.level_dimensions)
        l0_w, l0_h = self._level_dimensions[0]
        if l0_w * l0_h > DEFAULT_MAX_SLIDE_PIXELS:
            self._discard_handle()
            raise SlideTooLargeError(self.path, f"level 0 claims {l0_w}x{l0_h} px, more than any real slide")
        self._level_downsamples = tuple(float(d) for d in self._osr.level_downsamples)
        mpp_x = _parse_float(props.get("openslide.mpp-x"))
        mpp_y = _parse_float(props.get("openslide.mpp-y"))
        if mpp_x is not None and mpp_y is not None and abs(mpp_x - mpp_y) / mpp_x > 0.02:
            warnings.warn(f"{self.path}: non-square pixels (mpp-x {mpp_x}, mpp-y {mpp_y}); using mpp-x", stacklevel=2)
        self._mpp = mpp_x if mpp_x is not None else mpp_y
        self._objective_power = _parse_float(props.get("openslide.objective-power"))
        self._vendor = str(props.get("openslide.vendor") or "unknown")
        self._quickhash = props.get("openslide.quickhash-1")

    def _open(self) -> Any:
        import openslide

        from pathchat.wsi.formats import diagnose_unopenable

        try:
            return openslide.OpenSlide(self._open_target)
        except openslide.OpenSlideUnsupportedFormatError as e:
            raise diagnose_unopenable(self._open_target) or UnsupportedFormatError(
                self.path, "not a slide format OpenSlide recognises") from e
        except openslide.OpenSlideError as e:
            known = diagnose_unopenable(self._open_target)  # the header says: not supported, or damaged
            if known is not None:
                raise known from e
            if "unsupported" in str(e).lower():
                raise UnsupportedFormatError(self.path, f"OpenSlide cannot open it: {e}") from e
            raise CorruptSlideError(self.path, f"OpenSlide cannot open it: {e}") from e
        except OSError as e:
            raise UnsupportedFormatError(self.path, f"cannot open: {e}") from e

    @property
    def quickhash(self) -> str | None:
        """OpenSlide's content hash of the slide's pixel data (fingerprinting, not privacy-sensitive)."""
        return self._quickhash

    def _direct_reader(self) -> DirectTiffLevels | None:
        if not self._direct_checked:
            self._direct_checked = True
            if self._direct_decode:
                self._direct = DirectTiffLevels.open(self._open_target, self._vendor, self.level_dimensions)
                if self._direct is not None:
                    self._direct.verify(self._read_openslide_level)
        return self._direct

    def _read_openslide_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self._level_downsamples[level]
        return self._read_openslide((round(x * ds), round(y * ds)), level, (w, h), "white")

    def _read(self, l0_xy: tuple[int, int], level: int, size: tuple[int, int], edge_pixels: str) -> np.ndarray:
        direct = self._direct_reader()
        if direct is not None and level in direct.levels:
            ds = self._level_downsamples[level]
            if ds == int(ds) and l0_xy[0] % int(ds) == 0 and l0_xy[1] % int(ds) == 0:
                fill = 0 if edge_pixels == "black" else 255  # OpenSlide's transparent pixels, rendered alike
                try:
                    return direct.read(level, l0_xy[0] // int(ds), l0_xy[1] // int(ds), size[0], size[1], fill)
                except DirectDecodeError as e:
                    raise CorruptSlideError(
                        self.path, f"cannot decode level {level} region at l0 {l0_xy} size {size[0]}x{size[1]}: {e}"
                    ) from e
        return self._read_openslide(l0_xy, level, size, edge_pixels)

    def _read_openslide(self, l0_xy: tuple[int, int], level: int, size: tuple[int, int],
                        edge_pixels: str) -> np.ndarray:
        import openslide

        if self._osr is None:  # a previous read failed: the old handle is poisoned
            self._osr = self._open()
        try:
            image = self._osr.read_region(l0_xy, level, size)
        except openslide.OpenSlideError as e:
            self._discard_handle()
            raise CorruptSlideError(
                self.path, f"cannot decode level {level} region at l0 {l0_xy} size {size[0]}x{size[1]}: {e}"
            ) from e
        return rgba_to_rgb(np.asarray(image), edge_pixels)

    def _discard_handle(self) -> None:
        import openslide

        if self._osr is not None:
            # closing a handle in an error state may raise again; it is discarded anyway
            with contextlib.suppress(openslide.OpenSlideError):
                self._osr.close()
        self._osr = None

    def close(self) -> None:
        self._discard_handle()
        if self._direct is not None:
            self._direct.close()
            self._direct = None
            self._direct_checked = False


def _openslide_target(path: Path) -> str:
    """OpenSlide opens DICOM by any one file of the series; accept the series folder too."""
    if path.is_dir():
        candidates = sorted(p for p in path.iterdir() if p.is_file() and is_dicom_file(p))
        if not candidates:
            raise UnsupportedFormatError(path, "a folder is only a slide when it holds a DICOM series")
        return os.fspath(candidates[0])
    return os.fspath(path)


def is_dicom_file(path: Path) -> bool:
    """DICOM Part 10 files carry 'DICM' at byte 128 whatever their extension."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


class InMemorySlide(Slide):
    """A slide held as an array: for tests and for plain PNG/JPEG/single-level TIFF images."""

    def __init__(
        self,
        image: np.ndarray,
        mpp: float | None = None,
        objective_power: float | None = None,
        downsamples: tuple[int, ...] = (1,),
        path: str = "<memory>",
        vendor: str = "memory",
        max_read_pixels: int = DEFAULT_MAX_READ_PIXELS,
    ):
        super().__init__(path, max_read_pixels)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"{path}: expected uint8 RGB [h, w, 3], got {image.dtype} {image.shape}")
        if not downsamples or downsamples[0] != 1:
            raise ValueError(f"{path}: the first downsample must be 1, got {downsamples}")
        h, w = image.shape[:2]
        self._levels = [image]
        for d in downsamples[1:]:
            lw, lh = max(1, -(-w // d)), max(1, -(-h // d))
            self._levels.append(cv2.resize(image, (lw, lh), interpolation=cv2.INTER_AREA))
        self._level_dimensions = tuple((lv.shape[1], lv.shape[0]) for lv in self._levels)
        self._level_downsamples = tuple(float(d) for d in downsamples)
        self._mpp, self._objective_power, self._vendor = mpp, objective_power, vendor

    def _read(self, l0_xy: tuple[int, int], level: int, size: tuple[int, int], edge_pixels: str) -> np.ndarray:
        img = self._levels[level]
        ds = self._level_downsamples[level]
        x0, y0 = int(np.floor(l0_xy[0] / ds)), int(np.floor(l0_xy[1] / ds))
        w, h = size
        out = np.full((h, w, 3), 0 if edge_pixels == "black" else 255, dtype=np.uint8)
        sx0, sy0 = max(0, x0), max(0, y0)
        sx1, sy1 = min(img.shape[1], x0 + w), min(img.shape[0], y0 + h)
        if sx1 > sx0 and sy1 > sy0:
            out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = img[sy0:sy1, sx0:sx1]
        return out


def open_plain_image(
    path: str | os.PathLike[str],
    mpp: float | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> InMemorySlide:
    """Open a PNG/JPEG/single-level TIFF as a one-level slide, checking its size before decoding."""
    from PIL import Image, UnidentifiedImageError

    from pathchat.wsi.formats import NOT_RGB_MODES, not_brightfield

    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_image_pixels:
                raise SlideTooLargeError(
                    path, f"plain image of {w}x{h} px exceeds {max_image_pixels:,} px; convert it to a pyramidal TIFF"
                )
            if im.mode in NOT_RGB_MODES:
                raise not_brightfield(path, int(getattr(im, "n_frames", 1)), im.mode)
            # Pillow's own bomb guard would refuse large images we have already size-checked.
            previous = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                rgb = np.asarray(im.convert("RGBA"))
            finally:
                Image.MAX_IMAGE_PIXELS = previous
    except UnidentifiedImageError as e:
        raise UnsupportedFormatError(path, "not an image format Pillow recognises") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise CorruptSlideError(path, f"cannot decode image: {e}") from e
    return InMemorySlide(rgba_to_rgb_on_white(rgb), mpp=mpp, path=os.fspath(path), vendor="image")


def open_slide(path: str | os.PathLike[str], max_read_pixels: int = DEFAULT_MAX_READ_PIXELS,
               direct_decode: bool = True) -> Slide:
    """Open any supported slide: an OpenSlide file, a DICOM series folder, or a plain image.

    Raises:
        FileNotFoundError: the path does not exist.
        UnsupportedFormatError / CorruptSlideError / SlideTooLargeError: see `pathchat.wsi.errors`.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder")
    if p.suffix.lower() in PLAIN_IMAGE_SUFFIXES:
        return open_plain_image(p)
    try:
        return OpenSlideSlide(p, max_read_pixels=max_read_pixels, direct_decode=direct_decode)
    except UnsupportedFormatError:
        # A single-level, stripped TIFF is an ordinary image that OpenSlide does not read.
        if p.suffix.lower() in {".tif", ".tiff"}:
            try:
                return open_plain_image(p)
            except UnsupportedFormatError:
                pass
        raise


@dataclass(frozen=True)
class Resolution:
    """Level-0 µm per pixel and where it came from (override, metadata, objective_power, fallback)."""

    mpp: float
    source: str


def resolve_mpp(slide: Slide, override: float | None = None, fallback: float | None = None) -> Resolution:
    """Level-0 µm/px: explicit override > file mpp > objective power (10 / mag) > fallback > error.

    Raises:
        MissingResolutionError: nothing says how big a pixel is.
    """
    if override is not None:
        if override <= 0:
            raise ValueError(f"slide mpp override must be positive, got {override}")
        return Resolution(override, "override")
    if slide.mpp is not None:
        return Resolution(slide.mpp, "metadata")
    if slide.objective_power is not None:
        mpp = 10.0 / slide.objective_power
        warnings.warn(
            f"{slide.path}: no mpp in the file; assuming {mpp:g} µm/px from objective power "
            f"{slide.objective_power:g}x (10 / magnification). Pass --slide-mpp to override.",
            stacklevel=2,
        )
        return Resolution(mpp, "objective_power")
    if fallback is not None:
        return Resolution(fallback, "fallback")
    raise MissingResolutionError(
        slide.path,
        "the file records neither mpp nor objective power; pass --slide-mpp (level-0 µm per pixel, "
        "e.g. 0.25 for 40x or 0.5 for 20x) or --default-slide-mpp for all such slides",
    )


__all__ = [
    "InMemorySlide",
    "OpenSlideSlide",
    "Resolution",
    "Slide",
    "SlideError",
    "SlideInfo",
    "open_slide",
    "resolve_mpp",
]
