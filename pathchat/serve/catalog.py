"""The slides the web UI may open: a server-side folder plus accepted uploads, by opaque id only.

The browser never sends a path. Each slide gets an id derived (keyed HMAC) from its resolved path,
so ids reveal nothing and cannot be guessed; a file whose real path lies outside the allowed
folders (a symlink out of the slide folder) is not listed at all. Uploads are size-checked, must
be a single-file format, and must open with OpenSlide (or Pillow for PNG/JPEG) before they are kept.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import re
import secrets
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from pathchat.wsi.discovery import discover_slides

__all__ = ["CatalogSlide", "SlideCatalog", "UnknownSlideError", "UploadError", "UPLOAD_SUFFIXES"]

#: Single-file formats an upload may have (MIRAX and VMS need several files; DICOM series too).
UPLOAD_SUFFIXES = frozenset({".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".svslide", ".png", ".jpg", ".jpeg"})
_ID_RE = re.compile(r"^[0-9a-f]{16}$")


class UnknownSlideError(KeyError):
    """An id that names no slide of the catalog (the message never echoes a path)."""


class UploadError(ValueError):
    """An upload refused: too large, wrong format, or not readable as a slide (the message says which)."""


@dataclass(frozen=True)
class CatalogSlide:
    slide_id: str  # opaque id used by the browser
    name: str  # display name (the file's stem)
    path: Path  # resolved server-side path; never sent to the browser
    uploaded: bool


def _safe_name(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name).strip("._") or "slide"
    return stem[-120:]


class SlideCatalog:
    """Slides under `slides_dir` and `uploads_dir`, refreshed on demand; safe across threads."""

    def __init__(self, slides_dir: Path, uploads_dir: Path, max_upload_bytes: int):
        self.slides_dir = Path(slides_dir).resolve()
        self.uploads_dir = Path(uploads_dir)
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        self.uploads_dir = self.uploads_dir.resolve()
        self.max_upload_bytes = max_upload_bytes
        self._key = secrets.token_bytes(32)
        self._slides: dict[str, CatalogSlide] = {}
        self._lock = threading.Lock()
        self.refresh()

    @property
    def roots(self) -> tuple[Path, Path]:
        return self.slides_dir, self.uploads_dir

    def _id(self, path: Path) -> str:
        return hmac.new(self._key, str(path).encode(), hashlib.sha256).hexdigest()[:16]

    def _inside(self, path: Path) -> bool:
        return any(path.is_relative_to(root) for root in self.roots)

    def refresh(self) -> list[CatalogSlide]:
        """Rescan both folders; returns the slides in display order."""
        found: dict[str, CatalogSlide] = {}
        for root, uploaded in ((self.slides_dir, False), (self.uploads_dir, True)):
            for src in discover_slides([root]):
                real = src.path.resolve()
                if not self._inside(real) or not all(self._inside(f.resolve()) for f in src.files):
                    continue  # a symlink out of the allowed folders
                sid = self._id(real)
                found[sid] = CatalogSlide(sid, src.slide_id, real, uploaded)
        with self._lock:
            self._slides = found
        return self.list()

    def list(self) -> builtins.list[CatalogSlide]:
        with self._lock:
            return sorted(self._slides.values(), key=lambda s: (s.uploaded, s.name.lower()))

    def choices(self) -> builtins.list[tuple[str, str]]:
        """(label, id) pairs for a dropdown; labels carry no folder."""
        return [(f"{s.name} (uploaded)" if s.uploaded else s.name, s.slide_id) for s in self.list()]

    def get(self, slide_id: object) -> CatalogSlide:
        """The slide of an id.

        Raises:
            UnknownSlideError: not a well-formed id, or no such slide.
        """
        if not isinstance(slide_id, str) or not _ID_RE.match(slide_id):
            raise UnknownSlideError("unknown slide id")
        with self._lock:
            slide = self._slides.get(slide_id)
        if slide is None:
            raise UnknownSlideError("unknown slide id")
        return slide

    def add_upload(self, tmp_path: str | Path, original_name: str) -> CatalogSlide:
        """Check an uploaded file and keep it in the uploads folder.

        Raises:
            UploadError: too large, a format not accepted, or the file does not open as a slide.
        """
        from pathchat.wsi.deepzoom import DeepZoomSlide
        from pathchat.wsi.errors import SlideError
        from pathchat.wsi.slide import open_slide

        src = Path(tmp_path)
        name = _safe_name(original_name)
        suffix = Path(name).suffix.lower()
        if self.max_upload_bytes <= 0:
            raise UploadError("uploads are disabled on this server")
        if suffix not in UPLOAD_SUFFIXES:
            raise UploadError(f"{name}: {suffix or 'no extension'} is not an accepted single-file slide format "
                              f"({', '.join(sorted(UPLOAD_SUFFIXES))})")
        size = src.stat().st_size
        if size > self.max_upload_bytes:
            raise UploadError(f"{name}: {size / 2**20:.1f} MiB exceeds the {self.max_upload_bytes / 2**20:.0f} MiB limit")
        folder = self.uploads_dir / uuid.uuid4().hex
        folder.mkdir(parents=True)
        dest = folder / name
        shutil.copyfile(src, dest)
        try:
            DeepZoomSlide(dest).close()  # OpenSlide (or Pillow for plain images) must read it
            with open_slide(dest) as s:
                s.read_region((0, 0), s.level_count - 1, (min(64, s.level_dimensions[-1][0]),
                                                           min(64, s.level_dimensions[-1][1])))
        except (SlideError, OSError, ValueError) as e:
            shutil.rmtree(folder, ignore_errors=True)
            raise UploadError(f"{name}: not a readable slide ({type(e).__name__})") from e
        real = dest.resolve()
        slide = CatalogSlide(self._id(real), Path(name).stem, real, True)
        with self._lock:
            self._slides[slide.slide_id] = slide
        return slide
