"""The DICOM reader: display rendering checked pixel for pixel against the standard's formulas
(PS3.3 C.11.1 modality LUT, C.11.2.1.2 LINEAR window, C.11.6 presentation LUT), on real files from
pydicom's wheel and on files built here; compressed syntaxes; refusals; header fields; PHI tools."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from chexdist.data import dicom, phi
from chexdist.data.dicom import DicomError, is_dicom, load_dicom_gray8, read_header
from chexdist.data.images import encode, load_gray8
from chexdist.errors import ChexdistError

REPO = Path(__file__).resolve().parents[1]
KEY = b"k" * 32


def wheel_file(name: str) -> str:
    path = get_testdata_file(name, download=False)
    assert path is not None, name
    return path


def write_dicom(path, pixels: np.ndarray, photometric="MONOCHROME2", bits=12, **tags) -> Path:
    """A single-frame DX-like file built with pydicom's set_pixel_data (little endian, uncompressed)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.set_pixel_data(pixels, photometric, bits)
    for name, value in tags.items():
        setattr(ds, name, value)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR), as a 0..1 output: 0 if x <= c - 0.5 - (w-1)/2, 1 if
    x > c - 0.5 + (w-1)/2, else ((x - (c - 0.5)) / (w - 1) + 0.5)."""
    c, w = center - 0.5, width - 1.0
    return np.where(x <= c - w / 2, 0.0, np.where(x > c + w / 2, 1.0, (x - c) / w + 0.5))


def to8(y: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(y, 0, 1) * 255).astype(np.int16)


def assert_within_one(rendered: np.ndarray, expected: np.ndarray) -> None:
    assert rendered.dtype == np.uint8 and rendered.shape == expected.shape
    assert np.abs(rendered.astype(np.int16) - expected).max() <= 1


def test_real_cr_monochrome1_12bit_rescale_and_window():
    """pydicom's 6154: CR, MONOCHROME1, 12 bits stored, rescale 0.684/200, window 1600/2800."""
    path = wheel_file("6154")
    ds = pydicom.dcmread(path)
    assert (ds.PhotometricInterpretation, ds.BitsStored, float(ds.RescaleSlope), float(ds.RescaleIntercept)) == ("MONOCHROME1", 12, 0.684, 200.0)
    stored = ds.pixel_array.astype(np.float64)
    y = linear_window(stored * 0.684 + 200.0, float(ds.WindowCenter), float(ds.WindowWidth))
    expected = to8(1.0 - y)  # MONOCHROME1: minimum is white
    assert_within_one(load_gray8(path), expected)
    assert load_gray8(path).mean() != to8(y).mean()  # the inversion matters on this file


def test_built_monochrome1_rescale_and_multivalued_window_uses_the_first(tmp_path):
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 4096, (40, 48)).astype(np.uint16)
    path = write_dicom(tmp_path / "cr", stored, "MONOCHROME1", 12, RescaleSlope=0.5, RescaleIntercept=-100,
                       WindowCenter=[900, 500], WindowWidth=[1200, 300])
    expected = to8(1.0 - linear_window(stored * 0.5 - 100, 900, 1200))
    assert_within_one(load_gray8(path), expected)
    second = to8(1.0 - linear_window(stored * 0.5 - 100, 500, 300))
    assert np.abs(load_gray8(path).astype(np.int16) - second).max() > 1


def test_16bit_monochrome2_window_none_and_no_window(tmp_path):
    rng = np.random.default_rng(1)
    stored = rng.integers(1000, 30000, (32, 40)).astype(np.uint16)
    windowed = write_dicom(tmp_path / "w.dcm", stored, "MONOCHROME2", 16, WindowCenter=12000, WindowWidth=8000)
    assert_within_one(load_gray8(windowed), to8(linear_window(stored.astype(float), 12000, 8000)))
    # window "none": the full stored range 0..65535 -> 0..255, whatever the file's window says
    assert_within_one(load_gray8(windowed, dicom_window="none"), to8(stored / 65535.0))
    plain = write_dicom(tmp_path / "p.dcm", stored, "MONOCHROME2", 16)
    lo, hi = stored.min(), stored.max()
    assert_within_one(load_gray8(plain), to8((stored.astype(float) - lo) / (hi - lo)))


def test_presentation_lut_shape_inverse_inverts_once(tmp_path):
    stored = np.arange(64 * 16, dtype=np.uint16).reshape(32, 32) * 4
    plain = to8(linear_window(stored.astype(float), 2048, 4096))
    mono2_inverse = write_dicom(tmp_path / "a", stored, "MONOCHROME2", 12, WindowCenter=2048, WindowWidth=4096, PresentationLUTShape="INVERSE")
    mono1_inverse = write_dicom(tmp_path / "b", stored, "MONOCHROME1", 12, WindowCenter=2048, WindowWidth=4096, PresentationLUTShape="INVERSE")
    assert_within_one(load_gray8(mono2_inverse), 255 - plain)
    assert_within_one(load_gray8(mono1_inverse), 255 - plain)


def test_real_ct_signed_rescale_without_window():
    """CT_small: signed 16-bit, rescale 1/-1024, no window -> its own min..max after the modality LUT."""
    path = wheel_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert_within_one(load_gray8(path), to8((hu - hu.min()) / (hu.max() - hu.min())))


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_compressed_transfer_syntaxes_render_like_the_uncompressed_file(name):
    assert pydicom.dcmread(wheel_file(name)).file_meta.TransferSyntaxUID.is_compressed
    reference = load_gray8(wheel_file("MR_small.dcm"))
    ds = pydicom.dcmread(wheel_file("MR_small.dcm"))
    assert_within_one(reference, to8(linear_window(ds.pixel_array.astype(float), float(ds.WindowCenter), float(ds.WindowWidth))))
    assert np.array_equal(load_gray8(wheel_file(name)), reference)


def test_a_missing_decoder_names_the_package_to_install():
    """In a process where pylibjpeg cannot be imported (as without the [dicom] extra), JPEG-LS fails
    with its own kind and the package to install."""
    code = (
        "import sys\nsys.modules['pylibjpeg'] = None\nsys.modules['libjpeg'] = None\n"
        "from chexdist.data.images import load_gray8\n"
        f"try:\n    load_gray8({wheel_file('MR_small_jpeg_ls_lossless.dcm')!r})\n"
        "except Exception as e:\n    print(type(e).__name__, e.kind, e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert done.stdout.startswith("DicomError missing_decoder"), done.stdout + done.stderr[-500:]
    assert "pylibjpeg-libjpeg" in done.stdout and "chexdist[dicom]" in done.stdout


def test_files_are_recognised_by_content_not_name(tmp_path):
    stored = np.full((8, 8), 100, np.uint16)
    no_suffix = write_dicom(tmp_path / "series" / "IM0001", stored)
    assert is_dicom(no_suffix) and is_dicom(no_suffix.read_bytes())
    png_named_dcm = tmp_path / "fake.dcm"
    png_named_dcm.write_bytes(encode(np.zeros((8, 8), np.uint8)))
    assert not is_dicom(png_named_dcm)
    text_named_dcm = tmp_path / "notes.dcm"
    text_named_dcm.write_text("not an image")
    with pytest.raises(DicomError) as info:
        load_gray8(text_named_dcm)
    assert info.value.kind == "not_dicom"
    assert load_gray8(no_suffix.read_bytes()).shape == (8, 8)  # bytes (the web app's uploads) too


@pytest.mark.parametrize("name, kind", [("SC_rgb_rle.dcm", "photometric"), ("rtplan.dcm", "no_pixel_data"),
                                        ("test-SR.dcm", "no_pixel_data"), ("MR_truncated.dcm", "truncated")])
def test_real_files_that_yield_no_image_raise_their_kind(name, kind):
    with pytest.raises(DicomError) as info:
        load_gray8(wheel_file(name))
    assert info.value.kind == kind and "\n" not in str(info.value)


def test_multi_frame_and_the_pixel_cap_are_refused_before_decoding(tmp_path):
    frames = write_dicom(tmp_path / "mf", np.zeros((3, 8, 8), np.uint16))
    with pytest.raises(DicomError) as info:
        load_gray8(frames)
    assert info.value.kind == "multi_frame"
    big = write_dicom(tmp_path / "big", np.zeros((64, 64), np.uint16))
    with pytest.raises(DicomError) as info:
        load_dicom_gray8(big, max_pixels=64 * 63)
    assert info.value.kind == "too_large"
    assert load_dicom_gray8(big, max_pixels=64 * 64).shape == (64, 64)


def test_header_keeps_only_the_training_fields(tmp_path):
    path = write_dicom(tmp_path / "h", np.zeros((10, 12), np.uint16), PatientID="MRN-4711", PatientName="DOE^JANE",
                       PatientBirthDate="19700203", ViewPosition="AP", PatientSex="F", PatientAge="006M",
                       PixelSpacing=[0.2, 0.1], AccessionNumber="A99")
    header = read_header(path, KEY)
    assert header.meta() == {"view": "AP", "sex": "F", "age": 0, "pixel_spacing": [0.1, 0.2], "orig_size": [12, 10]}
    assert header.patient == phi.patient_number(KEY, "MRN-4711") != phi.patient_number(KEY, "MRN-4712")
    assert header.patient != phi.patient_number(b"x" * 32, "MRN-4711")
    assert dicom.age_years("047Y") == 47 and dicom.age_years("") is None and dicom.age_years("4Y") is None
    real = read_header(wheel_file("6154"), KEY)
    assert (real.view, real.age, real.pixel_spacing) == ("LL", 47, (0.1, 0.1))


def test_key_sources(tmp_path, monkeypatch):
    monkeypatch.delenv(phi.KEY_ENV, raising=False)
    out = tmp_path / "shards" / "x"
    path, where = phi.key_source(None, out)
    assert Path(path) == tmp_path / "shards" / "x.id-key" and "new" in where and not out.exists()
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    again, where = phi.key_source(None, out)
    assert again == path and "earlier" in where and phi.read_key(again) == phi.read_key(path)
    out.mkdir(parents=True)
    (out / "k").write_text("a" * 40)
    with pytest.raises(ChexdistError, match="inside the shard folder"):
        phi.key_source(out / "k", out)
    (tmp_path / "short").write_text("abc")
    with pytest.raises(ChexdistError, match="at least 16"):
        phi.key_source(tmp_path / "short", out)
    monkeypatch.setenv(phi.KEY_ENV, "e" * 20)
    assert phi.key_source(None, tmp_path / "other") == (None, f"${phi.KEY_ENV}")
    assert phi.read_key(None) == b"e" * 20


def test_phi_patterns_and_redaction():
    text = "file 1.2.840.113619.2.55.3 of DOE^JOHN born 19800101, sha 3f2a, version 0.1.0, 127.0.0.1"
    assert set(phi.find(text)) == {"DICOM UID", "DICOM person name", "date (YYYYMMDD)"}
    clean = phi.redact(text)
    assert "DOE" not in clean and "113619" not in clean and "19800101" not in clean and "0.1.0" in clean
    assert phi.find("train-000000.tar 0.684 2026-12-02 a19800101b p10/s5041/02aa804e-20110815-112c0b34.jpg") == []
    assert phi.find("MRN55/19800101_chest/IM1") == [phi.DATE]
    assert phi.pseudonymous_path(KEY, "MRN1/st/IM1.dcm").endswith(".dcm")
    assert "MRN1" not in phi.pseudonymous_path(KEY, "MRN1/st/IM1.dcm")
    assert "JOHN" not in phi.pseudonymous_path(KEY, "MRN1/DOE.JOHN")
