"""Why a file that no reader opens cannot be read: not supported, damaged, or not brightfield.

OpenSlide's messages say what failed inside it ("Couldn't get image flavor", "No pyramid levels
found"), not whether the file is broken. A file whose header parses is intact and merely not a kind
PathChat reads (a label-only DICOM, a DICOM without ImageType, a fluorescence QPTIFF); one whose
header does not parse is damaged. Only headers are read here, never pixels or free-text fields.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Literal

from pathchat.wsi.errors import CorruptSlideError, NotBrightfieldError, SlideError, UnsupportedFormatError

__all__ = ["NOT_RGB_MODES", "diagnose_unopenable", "not_brightfield"]

#: VL Whole Slide Microscopy Image Storage: the only DICOM class that holds a slide pyramid.
_VL_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
#: Pillow modes of single-channel images: fluorescence or grayscale, not an RGB brightfield stain.
NOT_RGB_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def not_brightfield(path: str | os.PathLike[str], pages: int, mode: str) -> NotBrightfieldError:
    """The error for a single-channel image (one page per channel in multiplex files)."""
    what = f"a {pages}-channel" if pages > 1 else "a single-channel"
    return NotBrightfieldError(path, f"{what} {mode!r} (grayscale) image, i.e. fluorescence or multiplex "
                                     "imaging; PathChat reads RGB brightfield (H&E) slides only")


def _diagnose_dicom(path: Path) -> SlideError | None:
    try:
        import pydicom

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # over-long UIDs and similar header quirks are not the point here
            ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as e:  # noqa: BLE001 - any header that does not parse means a damaged file
        return CorruptSlideError(path, f"a DICOM file whose header cannot be read ({type(e).__name__})")
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class != _VL_WSI_SOP_CLASS:
        return UnsupportedFormatError(path, f"a DICOM object of SOP class {sop_class or '(none)'}, not a VL Whole "
                                            "Slide Microscopy image")
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if not image_type:
        return UnsupportedFormatError(path, "a whole-slide DICOM without ImageType, which OpenSlide needs to find "
                                            "the pyramid; re-export it with ImageType ORIGINAL\\PRIMARY\\VOLUME")
    flavor = image_type[2] if len(image_type) > 2 else ""
    if flavor not in ("VOLUME", "THUMBNAIL"):
        return UnsupportedFormatError(path, f"a DICOM holding only a {flavor or 'untyped'} image, no VOLUME (tissue "
                                            "pyramid) image; pass the series folder or the VOLUME files")
    samples = int(ds.get("SamplesPerPixel", 3) or 3)
    if samples == 1:
        return not_brightfield(path, 1, str(ds.get("PhotometricInterpretation", "MONOCHROME")))
    return None


def _diagnose_tiff(path: Path, head: bytes) -> SlideError | None:
    from PIL import Image

    order: Literal["little", "big"] = "little" if head[:2] == b"II" else "big"
    big = head[2:4] in (b"+\x00", b"\x00+")
    first_ifd = int.from_bytes(head[8:16] if big else head[4:8], order)
    size = path.stat().st_size
    if first_ifd >= size:  # Aperio and most WSI TIFFs keep their directories at the end of the file
        return CorruptSlideError(path, f"truncated: its first TIFF directory lies at byte {first_ifd:,}, past the end "
                                       f"of the {size:,}-byte file (an interrupted copy or download?)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                mode, pages = im.mode, int(getattr(im, "n_frames", 1))
    except Exception:  # noqa: BLE001 - Pillow reads fewer TIFF flavours than OpenSlide: no verdict from it
        return None
    if mode in NOT_RGB_MODES:
        return not_brightfield(path, pages, mode)
    return None


def diagnose_unopenable(path: str | Path) -> SlideError | None:
    """A precise error for a file OpenSlide refused, from its header; None when nothing more is known."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(132)  # the TIFF header (16 bytes) and the DICOM preamble and magic (132)
    except OSError:
        return None
    if head[128:132] == b"DICM":
        return _diagnose_dicom(p)
    if head[:4] in _TIFF_MAGIC:
        return _diagnose_tiff(p, head)
    return None
