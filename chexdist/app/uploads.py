"""Uploads, defensively: a size cap enforced before the body is read (Content-Length) and while it
streams (chunked bodies), multipart parsed straight into a private temporary folder (never the
system temp dir, never memory for the whole file), the kind judged by the file's first bytes, and
decompression bombs refused from the header before any pixel is decoded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from chexdist.errors import ChexdistError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
DICOM_MAGIC_AT, DICOM_MAGIC = 128, b"DICM"
KINDS = ("png", "jpeg", "dicom")


class UploadError(ChexdistError):
    """A request the client must fix: `status` is the HTTP code (400, 413, 415, 422)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Upload:
    path: Path
    name: str
    fields: dict[str, str] = field(default_factory=dict)


@contextmanager
def private_folder(root: str | os.PathLike | None = None):
    """A fresh folder only this user can read (mkdtemp: mode 0700), removed with what it holds."""
    folder = Path(tempfile.mkdtemp(prefix="req-", dir=root))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def too_large(limit: int) -> UploadError:
    return UploadError(413, f"upload larger than the server's limit of {limit / 2**20:g} MB (--max-upload-mb)")


def declared_length(headers) -> int | None:
    """The request's Content-Length, or None when it has none (chunked) or it is not a number."""
    value = headers.get("content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def safe_name(raw: bytes | None) -> str:
    """The client's file name as a plain base name for the response (no folders, printable)."""
    name = os.path.basename((raw or b"upload").decode("utf-8", "replace").replace("\\", "/"))
    name = "".join(c for c in name if c.isprintable())[:200]
    return name or "upload"


async def receive_upload(request, folder: Path, limit: int) -> Upload:
    """The multipart field `file` written into `folder`, plus the plain text fields; 413 as soon as
    the body passes `limit` bytes, 400 for a body that is not multipart or has no `file`."""
    from python_multipart import create_form_parser
    from python_multipart.exceptions import FormParserError

    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise UploadError(400, "send the image as multipart/form-data with the field 'file'")
    files, fields = [], {}
    config = {"UPLOAD_DIR": str(folder), "MAX_MEMORY_FILE_SIZE": 0, "UPLOAD_DELETE_TMP": False}
    on_field = lambda f: fields.__setitem__(safe_name(f.field_name), (f.value or b"").decode("utf-8", "replace"))  # noqa: E731
    try:
        parser = create_form_parser({"Content-Type": content_type.encode("latin-1")}, on_field, files.append, config)
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise too_large(limit)
            parser.write(chunk)
        parser.finalize()
    except UploadError:
        raise
    except (FormParserError, ValueError) as exc:
        raise UploadError(400, f"malformed multipart body ({exc})") from None
    finally:
        for f in files:
            f.close()
    upload = next((f for f in files if f.field_name == b"file"), None)
    if upload is None:
        raise UploadError(400, "no file in the form: send the image in the multipart field 'file'")
    if upload.actual_file_name is None or upload.size == 0:
        raise UploadError(400, "the uploaded file is empty")
    return Upload(Path(os.fsdecode(upload.actual_file_name)), safe_name(upload.file_name), fields)


def sniff(path: Path) -> str:
    """png, jpeg or dicom from the first bytes (the name and the declared type are not trusted)."""
    with open(path, "rb") as f:
        head = f.read(DICOM_MAGIC_AT + len(DICOM_MAGIC))
    if head.startswith(PNG_MAGIC):
        return "png"
    if head.startswith(JPEG_MAGIC):
        return "jpeg"
    if head[DICOM_MAGIC_AT:] == DICOM_MAGIC:
        return "dicom"
    raise UploadError(415, "not a PNG, JPEG or DICOM file (judged by its content)")


def pixel_count(path: Path, kind: str) -> int:
    """Pixels the file would decode to, read from its header only."""
    if kind == "dicom":
        try:
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True)
            return int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * int(ds.get("NumberOfFrames", 1) or 1)
        except ImportError:
            raise UploadError(415, "DICOM needs pydicom on the server: pip install 'chexdist[dicom]'") from None
        except Exception as exc:  # pydicom raises many types for damaged headers
            raise UploadError(422, f"unreadable DICOM header ({type(exc).__name__})") from None
    from PIL import Image

    try:
        with warnings.catch_warnings():  # over the cap is refused below; Pillow's warning adds nothing
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return int(im.size[0]) * int(im.size[1])
    except Image.DecompressionBombError:
        raise UploadError(422, "image refused: its header declares more pixels than a decompression-bomb guard allows") from None
    except (OSError, SyntaxError, ValueError):  # the message names the server's temp path: not passed on
        raise UploadError(422, f"unreadable {kind.upper()}: the file is damaged or truncated") from None


def check_upload(path: Path, max_pixels: int) -> str:
    """The upload's kind, after refusing non-images (415) and decompression bombs (422)."""
    kind = sniff(path)
    pixels = pixel_count(path, kind)
    if pixels > max_pixels:
        raise UploadError(422, f"image of {pixels} pixels refused: more than the limit of {max_pixels} "
                               "(decompression-bomb guard)")
    if pixels == 0:
        raise UploadError(422, f"the {kind.upper()} holds no pixels")
    return kind
