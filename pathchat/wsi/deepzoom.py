"""Deep-zoom tiles of a slide for pan-and-zoom viewers (OpenSeadragon), over OpenSlide's generator.

`openslide.deepzoom.DeepZoomGenerator` does the pyramid arithmetic; this module adds what a web
server needs around it: level/column/row checks that raise one typed error (a 404, never a crash),
JPEG encoding, the slide's mpp for a scale bar, and the offset between deep-zoom pixels and level-0
pixels (with `limit_bounds`, the deep-zoom image starts at the scanned area's corner). Only pixels of
the pyramid leave this module: label, macro and raw metadata are never reachable from here.
"""

from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pathchat.wsi.errors import CorruptSlideError, SlideError, UnsupportedFormatError
from pathchat.wsi.slide import PLAIN_IMAGE_SUFFIXES, _openslide_target

__all__ = ["DeepZoomError", "DeepZoomSlide", "DeepZoomCache"]

#: Tile side plus twice the overlap is 256: the size OpenSeadragon and the openslide example use.
DEFAULT_TILE_SIZE = 254
DEFAULT_OVERLAP = 1
DEFAULT_JPEG_QUALITY = 80


class DeepZoomError(SlideError):
    """A tile request outside the pyramid (level, column or row), or a tile that cannot be read."""

    kind = "deepzoom"


@dataclass(frozen=True)
class DeepZoomInfo:
    """What a viewer needs besides the tiles (no label, macro or free-text metadata)."""

    width: int  # deep-zoom image size = the level-0 size of the scanned area
    height: int
    l0_offset: tuple[int, int]  # level-0 (x, y) of the deep-zoom image's top-left pixel
    mpp: float | None  # level-0 µm per pixel, for the scale bar
    level_count: int
    tile_size: int
    overlap: int


class DeepZoomSlide:
    """One slide's deep-zoom pyramid.

    Args:
        path: an OpenSlide file, a DICOM series folder, or a plain PNG/JPEG image.
        tile_size / overlap: deep-zoom tile side and overlap in pixels.
        limit_bounds: show only the scanned area (OpenSlide's `openslide.bounds-*`).
        jpeg_quality: quality of the encoded tiles (1-95).

    Raises:
        UnsupportedFormatError / CorruptSlideError: the slide cannot be opened.
    """

    def __init__(self, path: str | os.PathLike[str], tile_size: int = DEFAULT_TILE_SIZE,
                 overlap: int = DEFAULT_OVERLAP, limit_bounds: bool = True,
                 jpeg_quality: int = DEFAULT_JPEG_QUALITY):
        import openslide
        from openslide.deepzoom import DeepZoomGenerator

        self.path = Path(path)
        self.jpeg_quality = int(jpeg_quality)
        try:
            if self.path.suffix.lower() in PLAIN_IMAGE_SUFFIXES:
                self._osr: Any = openslide.ImageSlide(os.fspath(self.path))
            else:
                self._osr = openslide.OpenSlide(_openslide_target(self.path))
        except openslide.OpenSlideUnsupportedFormatError as e:
            raise UnsupportedFormatError(self.path, "not a slide format OpenSlide recognises") from e
        except (openslide.OpenSlideError, OSError) as e:
            raise CorruptSlideError(self.path, f"OpenSlide cannot open it: {e}") from e
        props = self._osr.properties
        self._dz = DeepZoomGenerator(self._osr, tile_size=tile_size, overlap=overlap, limit_bounds=limit_bounds)
        offset = (0, 0)
        if limit_bounds:
            offset = (int(props.get(openslide.PROPERTY_NAME_BOUNDS_X, 0) or 0),
                      int(props.get(openslide.PROPERTY_NAME_BOUNDS_Y, 0) or 0))
        mpp = props.get(openslide.PROPERTY_NAME_MPP_X)
        width, height = self._dz.level_dimensions[-1]
        self.info = DeepZoomInfo(width=int(width), height=int(height), l0_offset=offset,
                                 mpp=float(mpp) if mpp not in (None, "") else None,
                                 level_count=int(self._dz.level_count), tile_size=tile_size, overlap=overlap)

    def dzi_xml(self) -> str:
        """The DZI descriptor OpenSeadragon reads (tiles as JPEG)."""
        return str(self._dz.get_dzi("jpeg"))

    def tile_jpeg(self, level: int, col: int, row: int) -> bytes:
        """One deep-zoom tile as JPEG bytes.

        Raises:
            DeepZoomError: level, column or row outside the pyramid, or unreadable tile data.
        """
        import openslide

        if not 0 <= level < self._dz.level_count:
            raise DeepZoomError(self.path, f"no deep-zoom level {level} (levels 0..{self._dz.level_count - 1})")
        cols, rows = self._dz.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise DeepZoomError(self.path, f"no tile ({col}, {row}) at level {level} ({cols} x {rows} tiles)")
        try:
            tile = self._dz.get_tile(level, (col, row))
        except openslide.OpenSlideError as e:
            raise DeepZoomError(self.path, f"cannot read tile ({col}, {row}) at level {level}: {e}") from e
        buf = io.BytesIO()
        tile.convert("RGB").save(buf, "JPEG", quality=self.jpeg_quality)
        return buf.getvalue()

    def close(self) -> None:
        self._osr.close()


class DeepZoomCache:
    """A few open `DeepZoomSlide`s by key (least recently used closed first), safe across threads."""

    def __init__(self, capacity: int = 8, **slide_kwargs: Any):
        self.capacity = capacity
        self._slide_kwargs = slide_kwargs
        self._open: OrderedDict[str, DeepZoomSlide] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, path: str | os.PathLike[str]) -> DeepZoomSlide:
        with self._lock:
            dz = self._open.get(key)
            if dz is not None:
                self._open.move_to_end(key)
                return dz
        dz = DeepZoomSlide(path, **self._slide_kwargs)  # opened outside the lock: slow files block no one
        with self._lock:
            if key in self._open:  # another thread opened it meanwhile
                dz.close()
                return self._open[key]
            self._open[key] = dz
            while len(self._open) > self.capacity:
                # not closed here: a thread may still be reading a tile from it; the handle closes
                # when its last reference goes
                self._open.popitem(last=False)
            return dz

    def close(self) -> None:
        with self._lock:
            for dz in self._open.values():
                dz.close()
            self._open.clear()
