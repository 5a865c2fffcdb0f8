"""Transcoding on retrieve (dicomnode.transcode): choosing the syntax, decoding pydicom's corpus.

No sockets. Every compressed or deflated file in pydicom's ``test_files`` is transcoded to explicit
VR little endian, written as Part 10, read back and compared with pydicom's own decode of the
original, with every other installed decoder plugin, and with an independent reference where
pydicom ships one (an uncompressed or lossless sibling of the same image).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space, get_decoder
from pydicom.uid import UID, AllTransferSyntaxes

from dicomnode.transcode import (
    DECOMPRESSED,
    GDCM12_PLUGIN,
    LOSSLESS,
    RELABEL_LOSSLESS,
    RELABEL_LOSSY_CAPABLE,
    UNCOMPRESSED,
    TranscodeError,
    choose_syntax,
    is_lossy,
    transcode,
)
from tests.support.corpus import TEST_FILES

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.57"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEG_LS_NEAR = "1.2.840.10008.1.2.4.81"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
J2K = "1.2.840.10008.1.2.4.91"
HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"
HTJ2K_RPCL = "1.2.840.10008.1.2.4.202"
HTJ2K = "1.2.840.10008.1.2.4.203"
MPEG2 = "1.2.840.10008.1.2.4.100"
RLE = "1.2.840.10008.1.2.5"
ALL_SYNTAXES = tuple(str(ts) for ts in AllTransferSyntaxes)

# --- choose_syntax -----------------------------------------------------------------------------


def test_stored_syntax_is_kept_when_accepted() -> None:
    assert choose_syntax(J2K_LOSSLESS, [EXPLICIT, J2K_LOSSLESS]) == J2K_LOSSLESS
    assert choose_syntax(JPEG_BASELINE, [JPEG_BASELINE]) == JPEG_BASELINE  # already lossy: fine
    assert choose_syntax(IMPLICIT, [EXPLICIT, IMPLICIT]) == IMPLICIT
    assert choose_syntax(BIG_ENDIAN, [BIG_ENDIAN, EXPLICIT]) == BIG_ENDIAN
    assert choose_syntax(DEFLATED, [EXPLICIT, DEFLATED]) == DEFLATED


@pytest.mark.parametrize(
    ("stored", "accepted", "expected"),
    [
        # uncompressed or deflated: any uncompressed, explicit LE > implicit LE > explicit BE
        (IMPLICIT, [BIG_ENDIAN, EXPLICIT], EXPLICIT),
        (EXPLICIT, [BIG_ENDIAN, IMPLICIT], IMPLICIT),
        (EXPLICIT, [BIG_ENDIAN], BIG_ENDIAN),
        (BIG_ENDIAN, [IMPLICIT, EXPLICIT], EXPLICIT),
        (DEFLATED, [BIG_ENDIAN, IMPLICIT], IMPLICIT),
        # uncompressed data is never compressed, lossless or not
        (EXPLICIT, [RLE, J2K_LOSSLESS, JPEG_LS_LOSSLESS, DEFLATED], None),
        (IMPLICIT, [], None),
    ],
)
def test_uncompressed_data(stored: str, accepted: list[str], expected: str | None) -> None:
    assert choose_syntax(stored, accepted) == expected
    assert choose_syntax(stored, accepted, allow_lossy=True) == expected


@pytest.mark.parametrize(
    ("stored", "accepted", "expected"),
    [
        # decompression: explicit VR little endian preferred, then implicit
        (J2K_LOSSLESS, [IMPLICIT, EXPLICIT], EXPLICIT),
        (RLE, [IMPLICIT, JPEG_LS_LOSSLESS], IMPLICIT),
        (JPEG_BASELINE, [J2K, EXPLICIT], EXPLICIT),  # already lossy: decompressing adds nothing
        # never decompressed to big endian (retired; encapsulated data is little endian)
        (JPEG_LS_LOSSLESS, [BIG_ENDIAN], None),
        # never recompressed, neither lossless nor lossy
        (JPEG_BASELINE, [JPEG_EXTENDED, J2K], None),
        (RLE, [J2K_LOSSLESS, JPEG_LS_LOSSLESS], None),
        (MPEG2, [RLE], None),
        # the same bit stream under a lossless syntax that covers it: relabelled before decoding
        (JPEG_LOSSLESS_SV1, [EXPLICIT, JPEG_LOSSLESS], JPEG_LOSSLESS),
        (HTJ2K_RPCL, [IMPLICIT, HTJ2K_LOSSLESS], HTJ2K_LOSSLESS),
        # but not the other way (a Process 14 stream may use another predictor)
        (JPEG_LOSSLESS, [JPEG_LOSSLESS_SV1], None),
        (JPEG_LOSSLESS, [JPEG_LOSSLESS_SV1, IMPLICIT], IMPLICIT),
    ],
)
def test_compressed_data(stored: str, accepted: list[str], expected: str | None) -> None:
    assert choose_syntax(stored, accepted) == expected


@pytest.mark.parametrize(
    ("stored", "lossy_capable"),
    [(J2K_LOSSLESS, J2K), (HTJ2K_LOSSLESS, HTJ2K), (HTJ2K_RPCL, HTJ2K)],
)
def test_lossy_capable_syntax_only_when_allowed(stored: str, lossy_capable: str) -> None:
    """A lossless stream sent under a syntax that signals possible loss: refused by default."""
    assert choose_syntax(stored, [lossy_capable]) is None
    assert choose_syntax(stored, [lossy_capable], allow_lossy=True) == lossy_capable
    # decompression (no loss signalled) still comes first when both are possible
    assert choose_syntax(stored, [lossy_capable, IMPLICIT], allow_lossy=True) == IMPLICIT


def test_lossy_refusal_even_when_allowed_we_never_encode_lossy() -> None:
    for accepted in ([JPEG_BASELINE], [JPEG_EXTENDED], [JPEG_LS_NEAR], [J2K], [HTJ2K], [MPEG2]):
        assert choose_syntax(EXPLICIT, accepted) is None
        assert choose_syntax(EXPLICIT, accepted, allow_lossy=True) is None
        assert choose_syntax(RLE, accepted, allow_lossy=True) is None


def test_choose_syntax_invariants_over_every_pair() -> None:
    """For every stored syntax and every (up to two) accepted syntaxes: the answer is accepted,
    and a lossy-capable syntax is only new with allow_lossy."""
    for stored in ALL_SYNTAXES:
        for accepted in itertools.chain(
            ([ts] for ts in ALL_SYNTAXES), itertools.combinations(ALL_SYNTAXES, 2)
        ):
            for allow_lossy in (False, True):
                got = choose_syntax(stored, accepted, allow_lossy)
                if got is None:
                    continue
                assert got in accepted
                if got != stored and is_lossy(got):
                    assert allow_lossy, (stored, accepted, got)
                if got != stored and got not in UNCOMPRESSED:  # only a relabelling remains
                    relabels = RELABEL_LOSSLESS.get(stored, ())
                    if allow_lossy:
                        relabels += RELABEL_LOSSY_CAPABLE.get(stored, ())
                    assert got in relabels, (stored, accepted, got)
                if got in UNCOMPRESSED and got != stored and stored not in UNCOMPRESSED:
                    assert got in DECOMPRESSED or stored == DEFLATED


def test_lossless_set() -> None:
    for ts in (EXPLICIT, IMPLICIT, BIG_ENDIAN, DEFLATED, RLE, JPEG_LOSSLESS, JPEG_LOSSLESS_SV1):
        assert ts in LOSSLESS
    for ts in (JPEG_LS_LOSSLESS, J2K_LOSSLESS, HTJ2K_LOSSLESS, HTJ2K_RPCL):
        assert not is_lossy(ts)
    for ts in (JPEG_BASELINE, JPEG_EXTENDED, JPEG_LS_NEAR, J2K, HTJ2K, MPEG2, "1.2.3.4"):
        assert is_lossy(ts)


# --- the corpus --------------------------------------------------------------------------------


def _read(path: Path, **kwargs: Any) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, **kwargs)


def _corpus_syntax(path: Path) -> str | None:
    """The file's transfer syntax if it is compressed or deflated (what transcoding is for)."""
    try:
        ds = _read(path, stop_before_pixels=True)
    except Exception:
        return None  # not DICOM at all (README.txt, crayons.icc, ...)
    ts = UID(str(ds.get("file_meta", {}).get("TransferSyntaxUID", "")))
    if not ts.is_transfer_syntax or not (ts.is_compressed or ts.is_deflated):
        return None
    return str(ts)


def _not_an_instance(path: Path) -> str | None:
    """Why ``path`` is not a valid instance to retrieve, or None."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Expected explicit VR")
        try:
            ds = pydicom.dcmread(path)
        except UserWarning:
            return "the data set is implicit VR under an explicit VR transfer syntax (PS3.10 7.1)"
    if not ds.get("SOPClassUID") or not ds.get("SOPInstanceUID"):
        return "no SOP Class UID / SOP Instance UID: not a composite instance"
    if ds.file_meta.get("MediaStorageSOPInstanceUID") != ds.SOPInstanceUID:
        return "File Meta SOP Instance UID differs from the data set's"
    if "PixelData" not in ds:
        return "no Pixel Data"
    return None


def _corpus() -> Iterator[Any]:
    for path in sorted(p for p in TEST_FILES.rglob("*") if p.is_file()):
        ts = _corpus_syntax(path)
        if ts is None:
            continue
        reason = _not_an_instance(path)
        marks = [pytest.mark.skip(reason=f"not a valid instance: {reason}")] if reason else []
        yield pytest.param(path, ts, id=path.name, marks=marks)


CORPUS = list(_corpus())

# Files whose pixel data no decoder can decode: transcoding must fail with a clear message.
UNDECODABLE = {
    # pydicom's README: "4 of the encoded pixel data bytes replaced with the Sequence Delimiter,
    # almost certainly not a valid JPEG anymore" (a regression file for pydicom #1140)
    "JPEG2000-embedded-sequence-delimiter.dcm",
}

# Independent references: the same image, uncompressed or losslessly compressed, shipped by pydicom
# (pydicom's README; the SC_rgb 16/32-bit and 2-frame variants were made from the 8-bit image by a
# script: value x 257 / x 16843009, and a second frame that is the inverse).
Reference = tuple[str, Callable[[np.ndarray], np.ndarray]]
_SAME: Callable[[np.ndarray], np.ndarray] = lambda a: a  # noqa: E731


def _two_frames(scale: int, dtype: str) -> Callable[[np.ndarray], np.ndarray]:
    def build(a: np.ndarray) -> np.ndarray:
        img = a.astype(dtype) * scale
        return np.stack([img, np.iinfo(dtype).max - img])

    return build


EXACT_REFERENCE: dict[str, Reference] = {
    "MR_small_RLE.dcm": ("MR_small.dcm", _SAME),
    "MR_small_jp2klossless.dcm": ("MR_small.dcm", _SAME),
    "MR_small_jpeg_ls_lossless.dcm": ("MR_small.dcm", _SAME),
    "rtdose_rle.dcm": ("rtdose.dcm", _SAME),
    "rtdose_rle_1frame.dcm": ("rtdose_1frame.dcm", _SAME),
    "SC_rgb_jpeg_gdcm.dcm": ("SC_rgb_rle.dcm", _SAME),  # JPEG lossless SV1 vs RLE
    "SC_rgb_rle_16bit.dcm": ("SC_rgb_rle.dcm", lambda a: a.astype("u2") * 257),
    "SC_rgb_rle_32bit.dcm": ("SC_rgb_rle.dcm", lambda a: a.astype("u4") * 16843009),
    "SC_rgb_rle_2frame.dcm": ("SC_rgb_rle.dcm", _two_frames(1, "u1")),
    "SC_rgb_rle_16bit_2frame.dcm": ("SC_rgb_rle.dcm", _two_frames(257, "u2")),
    "SC_rgb_rle_32bit_2frame.dcm": ("SC_rgb_rle.dcm", _two_frames(16843009, "u4")),
}
# Lossy versions of an image whose lossless version pydicom ships: close, not equal.
LOSSY_REFERENCE: dict[str, str] = {
    **{
        name: "SC_rgb_rle.dcm"
        for name in (
            "SC_rgb_dcmtk_+eb+cr.dcm",
            "SC_rgb_dcmtk_+eb+cy+n1.dcm",
            "SC_rgb_dcmtk_+eb+cy+n2.dcm",
            "SC_rgb_dcmtk_+eb+cy+np.dcm",
            "SC_rgb_dcmtk_+eb+cy+s2.dcm",
            "SC_rgb_dcmtk_+eb+cy+s4.dcm",
            "SC_rgb_jpeg_dcmtk.dcm",
            "SC_rgb_jpeg_lossy_gdcm.dcm",
            "SC_rgb_gdcm_KY.dcm",
            "SC_rgb_jls_lossy_line.dcm",
            "SC_rgb_jls_lossy_sample.dcm",
        )
    },
    "SC_rgb_small_odd_jpeg.dcm": "SC_rgb_small_odd.dcm",
    "JPEG-lossy.dcm": "JPGExtended.dcm",  # JPGExtended is pydicom's fixed copy of JPEG-lossy
}


def test_the_references_are_in_the_corpus() -> None:
    """A file pydicom stops shipping must not silently drop a comparison."""
    names = {param.values[0].name for param in CORPUS}
    for name, (sibling, _) in EXACT_REFERENCE.items():
        assert name in names and (TEST_FILES / sibling).is_file(), name
    for name, sibling in LOSSY_REFERENCE.items():
        assert name in names and (TEST_FILES / sibling).is_file(), name
    assert UNDECODABLE.issubset(names)


# What decompression may change: the Image Pixel description of the new pixel data, the
# encapsulation-only offsets, and Lossy Image Compression when it was missing. Group lengths
# (gggg,0000) are retired (PS3.5 7.2) and pydicom does not write them.
CHANGED = {
    0x00280004,  # Photometric Interpretation
    0x00280006,  # Planar Configuration
    0x00280008,  # Number of Frames
    0x00282110,  # Lossy Image Compression
    0x7FE00001,  # Extended Offset Table
    0x7FE00002,  # Extended Offset Table Lengths
    0x7FE00010,  # Pixel Data
}
LOSSY_JPEG = (JPEG_BASELINE, JPEG_EXTENDED)


def _decode(path: Path, stored: str, **options: Any) -> np.ndarray:
    """pydicom's own decode of the original: lossy JPEG YCbCr as RGB, anything else as stored."""
    ds = _read(path)
    ds.pixel_array_options(as_rgb=stored in LOSSY_JPEG, **options)
    return ds.pixel_array


def _write_and_read(ds: Dataset, tmp_path: Path) -> Dataset:
    out = tmp_path / "out.dcm"
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return pydicom.dcmread(out)


def _kept(before: Dataset, after: Dataset) -> None:
    """Every element outside CHANGED is identical (tag, VR and value, sequences included)."""

    def tags(ds: Dataset) -> set[int]:
        # Dataset iterates over elements, not tags
        return {int(t) for t in ds.keys() if int(t) not in CHANGED and t.element != 0}  # noqa: SIM118

    assert tags(before) == tags(after)
    for tag in sorted(tags(before)):
        assert before[tag] == after[tag], f"{before[tag]} became {after[tag]}"


def _expected_photometric(ds: Dataset, stored: str) -> str:
    pi = str(ds.PhotometricInterpretation)
    if stored in LOSSY_JPEG and pi in ("YBR_FULL", "YBR_FULL_422"):
        return "RGB"  # as pydicom and DCMTK decompress lossy JPEG
    if pi in ("YBR_RCT", "YBR_ICT"):
        return "RGB"  # the JPEG 2000 codec undoes its own component transform
    return pi


@pytest.mark.parametrize(("path", "stored"), CORPUS)
def test_corpus_to_explicit_little_endian(path: Path, stored: str, tmp_path: Path) -> None:
    if path.name in UNDECODABLE:
        with pytest.raises(TranscodeError, match="decoding failed") as failed:
            transcode(path, EXPLICIT)
        assert UID(stored).name in str(failed.value)
        return

    original = _read(path)
    back = _write_and_read(transcode(path, EXPLICIT), tmp_path)

    assert back.file_meta.TransferSyntaxUID == EXPLICIT
    assert back.SOPInstanceUID == original.SOPInstanceUID  # the same instance
    assert back.PhotometricInterpretation == _expected_photometric(original, stored)
    if back.SamplesPerPixel > 1:
        assert back.PlanarConfiguration == 0
    lossy_declared = original.get("LossyImageCompression")
    if is_lossy(stored):
        assert back.LossyImageCompression == (lossy_declared or "01")
    else:
        assert back.get("LossyImageCompression") == lossy_declared
    _kept(original, back)

    got = back.pixel_array
    ref = _decode(path, stored)
    assert (got.shape, got.dtype) == (ref.shape, ref.dtype)
    # Lossless or not, the output is exactly what pydicom decodes from the original.
    assert np.array_equal(got, ref)
    frames = int(original.get("NumberOfFrames", 1) or 1)
    assert int(back.get("NumberOfFrames", 1) or 1) == frames
    assert len(back.PixelData) == ref.nbytes + ref.nbytes % 2

    if path.name in EXACT_REFERENCE:
        sibling, derive = EXACT_REFERENCE[path.name]
        expected = derive(_read(TEST_FILES / sibling).pixel_array)
        assert np.array_equal(got, expected), f"differs from {sibling}"
    if path.name in LOSSY_REFERENCE:
        sibling_ds = _read(TEST_FILES / LOSSY_REFERENCE[path.name])
        expected = sibling_ds.pixel_array
        assert got.shape == expected.shape
        diff = np.abs(got.astype(np.int64) - expected.astype(np.int64))
        full_scale = 2 ** int(back.BitsStored) - 1
        assert diff.mean() < 0.02 * full_scale, f"mean difference {diff.mean()}"
    if not is_lossy(stored):
        assert not is_lossy(str(back.file_meta.TransferSyntaxUID))


def _plugins(stored: str) -> tuple[str, ...]:
    if stored == DEFLATED:
        return ()
    return get_decoder(stored).available_plugins


@pytest.mark.parametrize(("path", "stored"), CORPUS)
def test_corpus_agrees_with_every_other_decoder(path: Path, stored: str) -> None:
    """Each installed plugin that decodes the original gives the same pixels as our output
    (GDCM vs Pillow for JPEG; GDCM vs pyjpegls for JPEG-LS; GDCM vs OpenJPEG via pylibjpeg and
    Pillow for JPEG 2000; pydicom's own RLE vs pylibjpeg-rle)."""
    if path.name in UNDECODABLE:
        pytest.skip("no decoder decodes it (see test_corpus_to_explicit_little_endian)")
    ours = _read(path)
    got = _decode(path, stored)
    agreeing = 0
    for plugin in _plugins(stored):
        try:
            other = _decode(path, stored, decoding_plugin=plugin)
        except Exception:  # noqa: S112 - a plugin that cannot decode this file proves nothing
            continue
        assert np.array_equal(got, other), f"{plugin} decodes {path.name} differently"
        agreeing += 1
    if stored != DEFLATED:
        assert agreeing >= 1, f"no plugin decodes {ours.SOPInstanceUID}"


# --- uncompressed to uncompressed --------------------------------------------------------------

NATIVE_FILES = [
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "ExplVR_BigEnd.dcm",  # RGB, 8 bits, big endian
    "SC_rgb_small_odd_big_endian.dcm",  # odd-length 8-bit RGB, big endian
    "rtdose.dcm",  # implicit, 32-bit, 15 frames
    "rtdose_expb.dcm",
    "examples_palette.dcm",  # palette colour: 16-bit LUT data as OW
    "image_dfl.dcm",  # deflated
]


@pytest.mark.parametrize("target", UNCOMPRESSED)
@pytest.mark.parametrize("name", NATIVE_FILES)
def test_native_to_native(name: str, target: str, tmp_path: Path) -> None:
    path = TEST_FILES / name
    original = _read(path)
    converted = transcode(path, target)
    # What pynetdicom's C-STORE checks against the Transfer Syntax UID before it sends.
    assert converted.original_encoding == (UID(target).is_implicit_VR, UID(target).is_little_endian)
    back = _write_and_read(converted, tmp_path)
    assert back.file_meta.TransferSyntaxUID == target
    assert np.array_equal(back.pixel_array, original.pixel_array)
    for keyword in ("PatientName", "StudyInstanceUID", "SOPInstanceUID", "Rows", "Columns"):
        assert back.get(keyword) == original.get(keyword)
    if original.PhotometricInterpretation == "PALETTE COLOR":  # the LUTs were swapped too
        assert np.array_equal(_luts(back), _luts(original))
    # every element survives (values compared after pydicom's own reading of both)
    assert {e.tag for e in original if e.tag.element} == {e.tag for e in back if e.tag.element}


def _luts(ds: Dataset) -> np.ndarray:
    """The palette LUT entries in the data set's own byte order (pydicom 3.0.2's apply_color_lut
    reads 16-bit OW LUT data in the machine's byte order, wrong for big endian data sets)."""
    order = "<" if ds.original_encoding[1] else ">"
    return np.stack(
        [
            np.frombuffer(ds[f"{colour}PaletteColorLookupTableData"].value, dtype=f"{order}u2")
            for colour in ("Red", "Green", "Blue")
        ]
    )


def test_palette_through_every_byte_order(tmp_path: Path) -> None:
    """Explicit LE to implicit (LUT VRs then come from the dictionary) to big endian to explicit
    LE again: the LUTs mean the same at every step and end byte for byte as they began."""
    original = _read(TEST_FILES / "examples_palette.dcm")
    path = TEST_FILES / "examples_palette.dcm"
    for i, target in enumerate((IMPLICIT, BIG_ENDIAN, EXPLICIT)):
        out = tmp_path / f"{i}.dcm"
        pydicom.dcmwrite(out, transcode(path, target), enforce_file_format=True)
        back = _read(out)
        assert np.array_equal(_luts(back), _luts(original)), target
        assert np.array_equal(back.pixel_array, original.pixel_array), target
        path = out
    assert _read(path).RedPaletteColorLookupTableData == original.RedPaletteColorLookupTableData


def test_big_endian_round_trip_is_byte_exact(tmp_path: Path) -> None:
    path = TEST_FILES / "MR_small.dcm"
    big = tmp_path / "big.dcm"
    pydicom.dcmwrite(big, transcode(path, BIG_ENDIAN), enforce_file_format=True)
    assert _read(big).PixelData != _read(path).PixelData  # the words really were swapped
    again = transcode(big, EXPLICIT)
    assert again.PixelData == _read(path).PixelData


# --- relabelling, no pixel data, refusals, missing decoders ------------------------------------


def test_relabel_keeps_the_bit_stream() -> None:
    path = TEST_FILES / "SC_rgb_jpeg_gdcm.dcm"  # JPEG lossless SV1
    out = transcode(path, JPEG_LOSSLESS)
    assert out.file_meta.TransferSyntaxUID == JPEG_LOSSLESS
    assert out.PixelData == _read(path).PixelData
    assert np.array_equal(out.pixel_array, _read(TEST_FILES / "SC_rgb_rle.dcm").pixel_array)


def _tiny(tmp_path: Path, syntax: str, pixel_data: bytes | None) -> Path:
    """A minimal Part 10 file claiming ``syntax``, with encapsulated ``pixel_data`` if given."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = "1.2.3.4.1"
    ds.PatientName = "Test^Tiny"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    if pixel_data is not None:
        ds.Rows, ds.Columns, ds.SamplesPerPixel = 8, 8, 1
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = encapsulate([pixel_data])
    path = tmp_path / "tiny.dcm"
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def test_compressed_syntax_without_pixel_data_is_just_reencoded(tmp_path: Path) -> None:
    out = transcode(_tiny(tmp_path, JPEG_LOSSLESS_SV1, None), IMPLICIT)
    assert out.file_meta.TransferSyntaxUID == IMPLICIT
    assert out.PatientName == "Test^Tiny"
    assert "LossyImageCompression" not in out


def test_no_decoder_for_the_syntax(tmp_path: Path) -> None:
    """MPEG-2 has no pydicom decoder at all: a clear error naming the syntax."""
    with pytest.raises(NotImplementedError):
        get_decoder(MPEG2)
    path = _tiny(tmp_path, MPEG2, b"\x00\x00\x01\xb3" + bytes(60))
    with pytest.raises(TranscodeError) as failed:
        transcode(path, EXPLICIT)
    message = str(failed.value)
    assert "MPEG2 Main Profile / Main Level (1.2.840.10008.1.2.4.100)" in message
    assert "Explicit VR Little Endian" in message
    assert "no pixel data decoder" in message


def test_missing_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    """JPEG lossless decodes only with python-gdcm: without it, a clear error naming the need."""
    decoder = get_decoder(JPEG_LOSSLESS_SV1)
    # The state pydicom is in when python-gdcm is not installed: the plugin is known, unavailable.
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable", {"gdcm": ("gdcm>=3.0.10",)})
    with pytest.raises(TranscodeError) as failed:
        transcode(TEST_FILES / "SC_rgb_jpeg_gdcm.dcm", EXPLICIT)
    message = str(failed.value)
    assert "JPEG Lossless, Non-Hierarchical, First-Order Prediction" in message
    assert "no decoder installed" in message
    assert "gdcm>=3.0.10" in message


def test_missing_12_bit_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without python-gdcm the plugin is never registered: a clear error, not a crash."""
    import dicomnode.transcode

    monkeypatch.setattr(dicomnode.transcode, "register_decoders", lambda: None)
    decoder = get_decoder(JPEG_EXTENDED)
    monkeypatch.setattr(
        decoder, "_available", {k: v for k, v in decoder._available.items() if k != GDCM12_PLUGIN}
    )
    with pytest.raises(TranscodeError, match="12-bit JPEG needs python-gdcm"):
        transcode(TEST_FILES / "JPGExtended.dcm", EXPLICIT)


@pytest.mark.parametrize(
    ("name", "target", "reason"),
    [
        ("MR_small.dcm", J2K_LOSSLESS, "only uncompressed targets"),
        ("MR_small.dcm", JPEG_BASELINE, "only uncompressed targets"),
        ("MR_small_RLE.dcm", J2K_LOSSLESS, "never recompressed"),
        ("MR_small_RLE.dcm", BIG_ENDIAN, "never recompressed"),
        ("SC_rgb_jpeg_dcmtk.dcm", J2K, "never recompressed"),
    ],
)
def test_conversions_we_do_not_do(name: str, target: str, reason: str) -> None:
    with pytest.raises(TranscodeError, match=reason):
        transcode(TEST_FILES / name, target)


def test_same_syntax_is_the_stored_data_set() -> None:
    path = TEST_FILES / "MR_small_RLE.dcm"
    out = transcode(path, RLE)
    assert out.PixelData == _read(path).PixelData


def test_unreadable_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 20)
    with pytest.raises(TranscodeError, match=r"bad\.dcm"):
        transcode(bad, EXPLICIT)


def test_lossless_ybr_full_stays_ybr_full(tmp_path: Path) -> None:
    """Only lossy JPEG is converted to RGB: lossless YBR_FULL data keeps its exact values."""
    ds = _read(TEST_FILES / "SC_rgb_small_odd.dcm")
    ybr = convert_color_space(ds.pixel_array, "RGB", "YBR_FULL")
    ds.PhotometricInterpretation = "YBR_FULL"
    ds.compress(RLE, ybr, encoding_plugin="pydicom")
    stored = tmp_path / "ybr_rle.dcm"
    ds.save_as(stored, enforce_file_format=True)
    back = _write_and_read(transcode(stored, EXPLICIT), tmp_path)
    assert back.PhotometricInterpretation == "YBR_FULL"
    back.pixel_array_options(as_rgb=False)
    assert np.array_equal(back.pixel_array, ybr)
