"""Read a DICOM radiograph as a viewer displays it, and only the header fields training needs.

Rendering follows the DICOM grayscale display pipeline (PS3.3 C.11, PS3.4 N.2) with pydicom 3's
`pydicom.pixels` functions: stored values -> modality LUT (Rescale Slope/Intercept or a Modality
LUT Sequence) -> VOI LUT Sequence or the FIRST Window Center/Width (LINEAR, LINEAR_EXACT or
SIGMOID) -> presentation LUT -> inverted when MONOCHROME1 -> 8-bit. The VOI output is scaled to
8 bits over the range the standard gives it (pydicom's windowing output range, or the VOI LUT's
entry depth), so a window maps its lower edge to 0 and its upper edge to 255.

- ``window="none"`` skips the VOI stage and maps the full stored range (0..2**BitsStored-1, or
  the signed range, through the modality LUT) to 0..255; a file with neither a VOI LUT nor a window
  is mapped from its own minimum to maximum after the modality LUT (a viewer's automatic window).
- Presentation LUT Shape INVERSE and MONOCHROME1 express the same inversion (PS3.3 C.8.11.6.1.2
  requires INVERSE for MONOCHROME1 "for presentation" images), so the image is inverted once when
  either says so; pydicom itself never inverts MONOCHROME1.
- Files are recognised by the ``DICM`` magic at byte 128 (exports often have no extension).
- Refused, each with a :class:`DicomError` whose `kind` is counted by pack: colour or other
  non-MONOCHROME1/2 data, multi-frame files, files without pixel data (structured reports,
  presentation states), images over `MAX_PIXELS` (checked in the header, before decoding: a
  compressed file cannot make the reader allocate more), transfer syntaxes whose decoder is not
  installed (the message names the package), truncated and unparsable files.

pydicom's warnings can quote header values (names, dates), so they are silenced while reading, and
every error reason passes through :func:`chexdist.data.phi.redact`.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np

from chexdist.data.images import ImageDecodeError, ImageSource
from chexdist.data.phi import patient_number, redact

SUFFIXES = (".dcm", ".dicom")
MAGIC = b"DICM"
MAGIC_OFFSET = 128
MAX_PIXELS = 100_000_000  # rows x columns; a 43 x 43 cm detector at 0.1 mm is 18.5 million
WINDOWS = ("auto", "none")
INSTALL = "pip install 'chexdist[dicom]'"
# Which pip package provides a decoder for each compressed family (pydicom names its plugins, not packages).
_DECODER_PACKAGES = {"JPEG 2000": "pylibjpeg-openjpeg", "JPEG-LS": "pylibjpeg-libjpeg", "JPEG": "pylibjpeg-libjpeg", "RLE": "pylibjpeg-rle"}
KINDS = ("not_dicom", "unreadable", "truncated", "no_pixel_data", "multi_frame", "photometric", "too_large", "missing_decoder", "undecodable")


class DicomError(ImageDecodeError):
    """A DICOM file that yields no image; `kind` (one of KINDS) is what pack counts it under."""

    def __init__(self, path: str, kind: str, reason: str):
        self.kind = kind
        self.label = f"DICOM {kind.replace('_', ' ')}"  # what pack's error_reasons count it under
        super().__init__(path, f"{self.label}: {redact(reason)}")


def is_dicom(src: ImageSource) -> bool:
    """True when `src` (a path or bytes) has the DICOM Part 10 magic at byte 128."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        head = bytes(src[: MAGIC_OFFSET + 4])
    else:
        try:
            with open(src, "rb") as f:
                head = f.read(MAGIC_OFFSET + 4)
        except OSError:
            return False
    return head[MAGIC_OFFSET:] == MAGIC


def read_dataset(src: ImageSource, where: str, pixels: bool = True):
    """Parse a DICOM file (path or bytes); without `pixels`, values over 1 KB of a file (the pixel
    data) are not read, only noted as present."""
    if not is_dicom(src):
        raise DicomError(where, "not_dicom", "no DICM magic at byte 128")
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError as exc:
        raise DicomError(where, "missing_decoder", f"reading DICOM needs pydicom: {INSTALL}") from exc
    fp = io.BytesIO(bytes(src)) if isinstance(src, (bytes, bytearray, memoryview)) else os.fspath(src)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(fp, defer_size=None if pixels or not isinstance(fp, str) else 1024)
    except (EOFError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise DicomError(where, "truncated", f"{type(exc).__name__}: {' '.join(str(exc).split())}") from exc
    except (InvalidDicomError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DicomError(where, "unreadable", f"{type(exc).__name__}: {' '.join(str(exc).split())}") from exc


def _check_image(ds, where: str, max_pixels: int) -> None:
    """Everything that can be refused from the header alone, before any pixel is decoded."""
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        sop = str(getattr(ds, "Modality", "") or "unknown modality")
        raise DicomError(where, "no_pixel_data", f"no pixel data ({sop}; e.g. a structured report or presentation state)")
    if "PixelData" not in ds:
        raise DicomError(where, "photometric", "float pixel data (parametric maps) is not a radiograph")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise DicomError(where, "photometric", f"photometric interpretation {photometric or 'missing'} is not MONOCHROME1/2 (grayscale radiographs only)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DicomError(where, "multi_frame", f"{frames} frames; only single-frame radiographs are read")
    pixels = int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0)
    if pixels == 0:
        raise DicomError(where, "unreadable", "Rows or Columns missing or zero")
    if pixels > max_pixels:
        raise DicomError(where, "too_large", f"{ds.Rows} x {ds.Columns} pixels exceed the cap of {max_pixels} (a decompression bomb?)")
    _check_decoder(ds, where)


def _check_decoder(ds, where: str) -> None:
    from pydicom.pixels import get_decoder

    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is None or not syntax.is_compressed:
        return
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise DicomError(where, "missing_decoder", f"no decoder for transfer syntax {syntax.name}") from exc
    if not decoder.is_available:
        package = next((pkg for family, pkg in _DECODER_PACKAGES.items() if syntax.name.startswith(family)), "pylibjpeg")
        raise DicomError(where, "missing_decoder", f"{syntax.name} needs a decoder: install {package} ({INSTALL})")


def _stored_range(ds) -> tuple[int, int]:
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _modality_range(ds) -> tuple[float, float]:
    """The modality LUT's output over the whole stored range (what `window="none"` displays)."""
    from pydicom.pixels import apply_modality_lut

    lo, hi = _stored_range(ds)
    probe = np.arange(lo, hi + 1, dtype=np.int64) if hi - lo < 1 << 17 else np.array([lo, hi], dtype=np.int64)
    out = apply_modality_lut(probe, ds)
    return float(out.min()), float(out.max())


def _voi(values: np.ndarray, ds, window: str) -> tuple[np.ndarray, float, float]:
    """(VOI output, its black level, its white level): the standard's output range for a window or
    VOI LUT, the stored range for window="none", the data's extremes when the file gives neither."""
    from pydicom.pixels import apply_voi_lut, apply_windowing

    if window == "none":
        return values, *_modality_range(ds)
    if ds.get("VOILUTSequence"):
        out = apply_voi_lut(values.astype(np.int64) if values.dtype.kind == "f" else values, ds, index=0, prefer_lut=True)
        item = ds.VOILUTSequence[0]
        peak = int(np.asarray(item.LUTData).max()) if item.get("LUTData") is not None else 0
        bits = min(int(item.LUTDescriptor[2]), max(1, math.ceil(math.log2(peak + 1))))
        return out, 0.0, float((1 << bits) - 1)
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        out = apply_windowing(values, ds, index=0)
        with np.errstate(over="ignore"):
            center, width = float(_first(ds.WindowCenter)), float(_first(ds.WindowWidth))
            black, white = apply_windowing(np.array([center - 1e6 * width - 1e6, center + 1e6 * width + 1e6]), ds, index=0)
        return out, float(black), float(white)
    return values, float(values.min()), float(values.max())


def _first(value):
    from pydicom.multival import MultiValue

    return value[0] if isinstance(value, (list, tuple, MultiValue)) else value


def render(ds, where: str = "<dicom>", window: str = "auto", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The displayed 8-bit grayscale image (writable uint8 HxW) of a parsed DICOM dataset."""
    from pydicom.pixels import apply_modality_lut, apply_presentation_lut

    if window not in WINDOWS:
        raise DicomError(where, "unreadable", f"unknown DICOM window {window!r}; choose one of {', '.join(WINDOWS)}")
    _check_image(ds, where, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stored = ds.pixel_array
            values = apply_modality_lut(stored, ds)
            out, black, white = _voi(values, ds, window)
            if ds.get("PresentationLUTSequence"):
                out = apply_presentation_lut(out, ds)
                black, white = 0.0, float((1 << int(ds.PresentationLUTSequence[0].LUTDescriptor[2])) - 1)
    except (ValueError, RuntimeError, NotImplementedError, AttributeError, KeyError, TypeError, EOFError) as exc:
        text = " ".join(str(exc).split())
        short = isinstance(exc, EOFError) or any(word in text.lower() for word in ("less than expected", "length", "truncat"))
        raise DicomError(where, "truncated" if short else "undecodable", f"{type(exc).__name__}: {text}") from exc
    if out.ndim != 2:
        raise DicomError(where, "multi_frame", f"pixel data decoded to shape {out.shape}, not one 2-D frame")
    span = white - black
    scaled = np.zeros(out.shape, np.float64) if span == 0 else (out.astype(np.float64) - black) / span
    shape = str(ds.get("PresentationLUTShape", "")).strip().upper()
    if str(ds.PhotometricInterpretation).strip().upper() == "MONOCHROME1" or shape == "INVERSE":
        scaled = 1.0 - scaled
    return np.rint(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def load_dicom_gray8(src: ImageSource, name: str | None = None, window: str = "auto", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode and render a DICOM file (path or bytes) to 8-bit gray; raise DicomError."""
    where = name if name is not None else ("<bytes>" if isinstance(src, (bytes, bytearray, memoryview)) else os.fspath(src))
    return render(read_dataset(src, where), where, window, max_pixels)


@dataclass(frozen=True)
class DicomHeader:
    """The only header fields chexdist keeps. `sop_instance_uid` is for matching a labels CSV in
    memory and is never written (`meta` leaves it out)."""

    patient: int | None  # keyed pseudonym of PatientID (phi.patient_number); None without a PatientID
    view: str | None
    sex: str | None
    age: int | None  # years
    pixel_spacing: tuple[float | None, float | None]  # (x, y) mm
    size: tuple[int, int]  # (width, height)
    sop_instance_uid: str | None = None
    problem: str | None = None  # why the file yields no image, when its header already says so

    def meta(self) -> dict:
        return {"view": self.view, "sex": self.sex, "age": self.age, "pixel_spacing": list(self.pixel_spacing), "orig_size": list(self.size)}


_AGE_UNITS = {"Y": 1.0, "M": 12.0, "W": 52.1775, "D": 365.25}


def age_years(value) -> int | None:
    """DICOM AS ("047Y", "006M", "010W", "003D") as whole years; None when absent or malformed."""
    text = str(value or "").strip().upper()
    if len(text) != 4 or not text[:3].isdigit() or text[3] not in _AGE_UNITS:
        return None
    return int(int(text[:3]) / _AGE_UNITS[text[3]])


def _spacing(ds) -> tuple[float | None, float | None]:
    """(x, y) in mm from PixelSpacing, else ImagerPixelSpacing (DICOM stores row spacing first)."""
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(tag)
        try:
            if value is not None and len(value) == 2:
                return float(value[1]), float(value[0])
        except (TypeError, ValueError):
            continue
    return None, None


def read_header(src: ImageSource, key: bytes, name: str | None = None) -> DicomHeader:
    """The kept header fields of a DICOM file, without reading its pixel data."""
    where = name if name is not None else os.fspath(src) if not isinstance(src, (bytes, bytearray, memoryview)) else "<bytes>"
    ds = read_dataset(src, where, pixels=False)
    patient = str(ds.get("PatientID", "") or "").strip()
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    uid = ds.get("SOPInstanceUID")
    try:
        _check_image(ds, where, MAX_PIXELS)
        problem = None
    except DicomError as exc:
        problem = exc.kind
    return DicomHeader(
        patient=patient_number(key, patient) if patient else None,
        view=view or None,
        sex=sex if sex in ("M", "F", "O") else None,
        age=age_years(ds.get("PatientAge")),
        pixel_spacing=_spacing(ds),
        size=(int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0)),
        sop_instance_uid=str(uid) if uid else None,
        problem=problem,
    )
