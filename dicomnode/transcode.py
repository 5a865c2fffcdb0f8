"""Transcoding on retrieve: sending a stored instance in a transfer syntax the destination accepts.

Instances are stored exactly as they arrived (README, "How instances are stored"). When a C-MOVE or
C-GET destination accepts none of the presentation contexts for an instance's stored transfer
syntax, the sub-operation may still go ahead in another syntax:

- :func:`choose_syntax` picks the syntax to send in from what the destination accepted;
- :func:`transcode` reads the stored file and returns a :class:`~pydicom.dataset.Dataset` encoded
  for that syntax, or raises :class:`TranscodeError` with a message for the log.

Compressed pixel data is decompressed through pydicom's pixel decoders (``pydicom.pixels``), with
the decoder packages listed in ``pyproject.toml``: python-gdcm, pyjpegls, Pillow, pylibjpeg with
pylibjpeg-openjpeg and pylibjpeg-rle; no GPL decoder (README, "Transcoding on retrieve"). pydicom's
own plugins do not decode 12-bit JPEG Extended without the GPL pylibjpeg-libjpeg, so this module
registers one more plugin for that case, calling GDCM's 12-bit IJG decoder (see
:func:`_decode_jpeg12_gdcm`).

Nothing here adds loss: the data is sent in its stored syntax, decompressed, or relabelled under a
syntax that covers the same bit stream. A lossy-capable syntax the data was not already in is never
chosen unless the caller allows it. The module reads the stored file and nothing else: no sockets,
no pynetdicom.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.filewriter import correct_ambiguous_vr
from pydicom.pixels.decoders.base import DecodeRunner, get_decoder
from pydicom.pixels.processing import convert_color_space
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pydicom.valuerep import VR

from dicomnode.encoding import EncodingError, inflate


class TranscodeError(ValueError):
    """A stored instance cannot be sent in the requested transfer syntax; the message names the
    syntaxes and the reason (no decoder installed, decoding failed, no such conversion)."""


# --- transfer syntax vocabulary ----------------------------------------------------------------

# Native (uncompressed) syntaxes in our order of preference when we may pick any of them.
UNCOMPRESSED: tuple[str, ...] = (
    str(ExplicitVRLittleEndian),
    str(ImplicitVRLittleEndian),
    str(ExplicitVRBigEndian),
)
# What compressed pixel data is decompressed to (encapsulated data is little endian only; explicit
# VR big endian is retired and is not offered as a decompression target).
DECOMPRESSED: tuple[str, ...] = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))

# Syntaxes whose data is exactly the original: native, deflated, and the lossless-only compressed
# syntaxes. Every other syntax (JPEG baseline/extended, JPEG-LS near-lossless, JPEG 2000 and HTJ2K
# that allow lossy, MPEG, HEVC, and any syntax we do not know) counts as lossy.
LOSSLESS: frozenset[str] = frozenset(
    {
        *UNCOMPRESSED,
        str(DeflatedExplicitVRLittleEndian),
        str(JPEGLossless),
        str(JPEGLosslessSV1),
        str(JPEGLSLossless),
        str(JPEG2000Lossless),
        str(JPEG2000MCLossless),
        str(HTJ2KLossless),
        str(HTJ2KLosslessRPCL),
        str(RLELossless),
        "1.2.840.10008.1.2.4.65",  # JPEG Lossless, Hierarchical (Process 28), retired
        "1.2.840.10008.1.2.4.66",  # JPEG Lossless, Hierarchical (Process 29), retired
        "1.2.840.10008.1.2.7.1",  # SMPTE ST 2110-20 uncompressed progressive active video
        "1.2.840.10008.1.2.7.2",  # SMPTE ST 2110-20 uncompressed interlaced active video
        "1.2.840.10008.1.2.7.3",  # SMPTE ST 2110-30 PCM digital audio
    }
)

# A stored bit stream that is also a valid bit stream of another syntax, so it can be sent under
# that syntax unchanged (no decoding): Process 14 with selection value 1 is Process 14 (PS3.5
# A.4.1); the RPCL-constrained HTJ2K stream is an HTJ2K lossless stream (PS3.5 A.4.6).
RELABEL_LOSSLESS: Mapping[str, tuple[str, ...]] = {
    str(JPEGLosslessSV1): (str(JPEGLossless),),
    str(HTJ2KLosslessRPCL): (str(HTJ2KLossless),),
}
# The same, into syntaxes that also allow lossy data (PS3.5 A.4.4, A.4.6): the pixels do not
# change, but the destination sees a lossy-capable syntax, so these need ``allow_lossy``.
RELABEL_LOSSY_CAPABLE: Mapping[str, tuple[str, ...]] = {
    str(JPEG2000Lossless): ("1.2.840.10008.1.2.4.91",),
    str(JPEG2000MCLossless): ("1.2.840.10008.1.2.4.93",),
    str(HTJ2KLossless): ("1.2.840.10008.1.2.4.203",),
    str(HTJ2KLosslessRPCL): ("1.2.840.10008.1.2.4.203",),
}


LOSSY_JPEG = (str(JPEGBaseline8Bit), str(JPEGExtended12Bit))


def _name(uid: str) -> str:
    """A transfer syntax for messages: its name and UID, e.g. ``RLE Lossless (1.2.840...5)``."""
    known = UID(uid)
    return f"{known.name} ({uid})" if known.is_transfer_syntax else uid


def _is_native(uid: str) -> bool:
    """Uncompressed or deflated: pixel data (if any) is not encapsulated."""
    return uid in UNCOMPRESSED or uid == str(DeflatedExplicitVRLittleEndian)


def is_lossy(uid: str) -> bool:
    """Whether data in syntax ``uid`` may have been lossy compressed (unknown syntaxes: yes)."""
    return uid not in LOSSLESS


def choose_syntax(stored: str, accepted: Sequence[str], allow_lossy: bool = False) -> str | None:
    """The transfer syntax to send a stored instance in, or None when nothing fits.

    ``stored`` is the instance's stored transfer syntax; ``accepted`` the syntaxes the destination
    accepted for its SOP class (the transfer syntaxes of its accepted presentation contexts), in any
    order. In order:

    1. the stored syntax, if accepted (no transcoding);
    2. uncompressed or deflated data: an accepted uncompressed syntax, explicit VR little endian
       preferred, then implicit VR little endian, then explicit VR big endian;
    3. compressed data: a syntax that covers the same bit stream unchanged (JPEG lossless SV1 as
       JPEG lossless Process 14; HTJ2K RPCL as HTJ2K lossless);
    4. compressed data: decompression to explicit, else implicit, VR little endian;
    5. with ``allow_lossy`` only: a lossless JPEG 2000 / HTJ2K stream sent under the
       lossy-capable JPEG 2000 / HTJ2K syntax (same pixels, but the syntax signals possible loss).

    A lossy-capable syntax the data was not already in is never returned unless ``allow_lossy``;
    nothing is ever recompressed. Whether a decoder is installed is :func:`transcode`'s concern:
    it raises :class:`TranscodeError` with the reason.
    """
    offered = {str(uid) for uid in accepted}
    if stored in offered:
        return stored
    if _is_native(stored):
        return next((uid for uid in UNCOMPRESSED if uid in offered), None)
    for candidates in (RELABEL_LOSSLESS.get(stored, ()), DECOMPRESSED):
        for uid in candidates:
            if uid in offered:
                return uid
    if allow_lossy:
        for uid in RELABEL_LOSSY_CAPABLE.get(stored, ()):
            if uid in offered:
                return uid
    return None


# --- transcoding -------------------------------------------------------------------------------

# Bytes per value of the VRs whose values pydicom keeps as raw bytes in the file's byte order;
# these are swapped when the byte order changes (pydicom's writer does not, see dcmwrite).
_WORD_SIZE: Mapping[str, int] = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def transcode(path: Path, target: str) -> Dataset:
    """The stored Part 10 file at ``path`` as a data set encoded for transfer syntax ``target``.

    Compressed to uncompressed (``target`` from :func:`choose_syntax`): every frame is decoded
    with pydicom's pixel decoders, keeping the SOP Instance UID (it is the same instance). Lossy
    JPEG in YBR_FULL or YBR_FULL_422 is returned as RGB, with pydicom's own conversion, as
    pydicom's ``decompress`` and DCMTK's ``dcmdjpeg`` do; JPEG 2000 YBR_RCT/YBR_ICT come out as
    RGB from the codec; any other YBR_FULL_422 is relabelled YBR_FULL (decoded chroma is no longer
    subsampled); every other colour space is kept, so lossless data stays pixel-exact. Colour data
    comes out colour-by-pixel. Photometric Interpretation, Planar Configuration and Number of
    Frames are set to match the decoded pixels; Extended Offset Table (Lengths) go; data decoded
    from a lossy-capable syntax without Lossy Image Compression (0028,2110) gets ``01`` (PS3.3
    C.7.6.1.1.5). Every other attribute is kept. A compressed bit stream valid under ``target`` as
    it is (:data:`RELABEL_LOSSLESS`, :data:`RELABEL_LOSSY_CAPABLE`) is only relabelled.

    Uncompressed or deflated to uncompressed: the data set is only re-encoded; when the byte order
    changes, the values of OW/OF/OL/OD/OV elements are byte-swapped (UN values, whose structure is
    unknown, are left as they are).

    The returned data set's ``file_meta.TransferSyntaxUID`` is ``target``; the caller encodes it
    (pynetdicom's C-STORE, or ``dcmwrite``).

    Memory: the whole instance is read into memory, and decompression holds the compressed pixel
    data, the decoded frames in one buffer and, while the Pixel Data value is built, a second copy
    of them: about compressed + 2 x decoded (colour conversion works one frame at a time). That is
    accepted for the rare retrieve that needs transcoding -- a 1 GB compressed instance may need
    several GB -- while everything else is sent from disk as stored.

    Raises :class:`TranscodeError` when the conversion is not one we do, no decoder is installed
    for the stored syntax, or decoding fails. ``OSError`` from reading the file propagates.
    """
    register_decoders()
    try:
        _check_inflated_size(path)
        ds = pydicom.dcmread(path)
    except OSError:
        raise
    except Exception as exc:
        raise TranscodeError(f"cannot read stored file {path.name}: {exc}") from exc
    meta = getattr(ds, "file_meta", None)
    stored = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if not stored:
        raise TranscodeError(f"stored file {path.name} has no Transfer Syntax UID")
    if target == stored:
        return ds
    where = f"{_name(stored)} to {_name(target)}"
    if _is_native(stored):
        if target not in UNCOMPRESSED:
            raise TranscodeError(
                f"cannot transcode {where}: only uncompressed targets are supported"
            )
        _reencode_native(ds, stored, target, where)
    elif target in RELABEL_LOSSLESS.get(stored, ()) or target in RELABEL_LOSSY_CAPABLE.get(
        stored, ()
    ):
        pass  # the same bit stream is valid under ``target``
    elif target in DECOMPRESSED:
        if "PixelData" in ds:
            _decompress(ds, stored, where)
    else:
        raise TranscodeError(
            f"cannot transcode {where}: compressed data is only decompressed to explicit or "
            "implicit VR little endian (never recompressed)"
        )
    _take_encoding(ds, UID(target))
    return ds


def _take_encoding(ds: Dataset, syntax: UID) -> None:
    """Make ``ds`` a data set of ``syntax``, as if read in it: pynetdicom's C-STORE refuses one
    whose encoding as read (explicit VR little endian, say) is not its Transfer Syntax UID's.

    Every element is parsed first, and VRs left ambiguous by implicit VR resolved: pydicom's
    writer copies still-unparsed elements as they were read when the data set's encoding is
    the one it writes, which would put implicit VR bytes into an explicit VR stream.
    """
    correct_ambiguous_vr(ds, syntax.is_little_endian)
    ds.walk(lambda _ds, _elem: None)  # parses every element, in sequence items too
    ds.file_meta.TransferSyntaxUID = syntax
    ds.set_original_encoding(
        syntax.is_implicit_VR, syntax.is_little_endian, ds.original_character_set
    )


def _check_inflated_size(path: Path) -> None:
    """pydicom inflates a deflated data set whole in memory: first count what it would inflate
    to, in bounded steps, and refuse past :func:`dicomnode.encoding.inflate_limit` (the store
    refused such data sets; a file put in the store by other means is not trusted either)."""
    with path.open("rb") as fp:
        head = fp.read(144)
        if len(head) < 144 or head[128:132] != b"DICM" or head[132:138] != b"\x02\x00\x00\x00UL":
            return  # not our Part 10 layout: pydicom's reader decides
        meta_end = 144 + int.from_bytes(head[140:144], "little")
        fp.seek(132)
        meta = fp.read(meta_end - 132)
        if str(DeflatedExplicitVRLittleEndian).encode("ascii") not in meta:
            return
        fp.seek(meta_end)
        try:
            inflate(fp, os.fstat(fp.fileno()).st_size)
        except EncodingError as exc:
            raise TranscodeError(f"cannot read stored file {path.name}: {exc}") from exc


def _reencode_native(ds: Dataset, stored: str, target: str, where: str) -> None:
    """Prepare native data for another native syntax: only the byte order may need work."""
    stored_le = stored != str(ExplicitVRBigEndian)
    target_le = target != str(ExplicitVRBigEndian)
    if stored_le == target_le:
        return
    # Implicit VR leaves some VRs ambiguous (Pixel Data "OB or OW", LUT data "US or OW"): resolve
    # them while the values are still read in the stored byte order, then swap the word values.
    correct_ambiguous_vr(ds, stored_le)
    _swap_bytes(ds, where)


def _swap_bytes(ds: Dataset, where: str) -> None:
    """Byte-swap the raw values of ``ds`` and its sequence items for the other byte order."""
    for elem in ds:
        if elem.VR == VR.SQ:
            for item in elem.value:
                _swap_bytes(item, where)
            continue
        size = _WORD_SIZE.get(str(elem.VR))
        if size is None or not isinstance(elem.value, bytes | bytearray) or not elem.value:
            continue
        if elem.tag == 0x7FE00010 and int(ds.get("BitsAllocated", 16)) in (32, 64):
            # Pixel Data is OW however wide its samples; the byte order applies to each sample
            # (pydicom reads big endian 32-bit pixels as '>u4', DCMTK writes them so).
            size = int(ds.BitsAllocated) // 8
        if len(elem.value) % size:
            raise TranscodeError(
                f"cannot transcode {where}: {elem.tag} {elem.VR} has {len(elem.value)} bytes, "
                f"not a whole number of {size}-byte values to byte-swap"
            )
        elem.value = np.frombuffer(elem.value, dtype=f"u{size}").byteswap().tobytes()


def _decompress(ds: Dataset, stored: str, where: str) -> None:
    """Decompress the pixel data in place with pydicom's decoders (see :func:`transcode`).

    This is :func:`pydicom.pixels.decompress` done with ``Decoder.as_array``, for two reasons
    found in pydicom 3.0.2: ``decompress`` goes through ``Decoder.iter_array``, which fails with
    "output array is read-only" when a JPEG 2000 or JPEG-LS stream needs its sign corrected and
    the plugin (GDCM, Pillow) returns ``bytes`` (J2K_pixelrep_mismatch.dcm); and with
    ``as_rgb=False`` it labels upsampled JPEG output YBR_FULL_422. ``as_array`` decodes every
    frame into one writeable buffer and applies the same corrections; the YCbCr to RGB conversion
    (the same function pydicom's ``as_rgb`` uses) is then done here one frame at a time, instead
    of on the whole array in float32.
    """
    try:
        decoder = get_decoder(stored)
    except NotImplementedError as exc:
        raise TranscodeError(
            f"cannot transcode {where}: pydicom has no pixel data decoder for this syntax"
        ) from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugins"
        raise TranscodeError(
            f"cannot transcode {where}: no decoder installed for this syntax ({missing})"
        )
    bits = int(ds.get("BitsAllocated", 0))
    if bits not in (8, 16, 32, 64):
        raise TranscodeError(
            f"cannot transcode {where}: Bits Allocated {bits} is not decompressed here "
            "(8, 16, 32 or 64 only)"
        )
    plugin = ""
    if stored == str(JPEGExtended12Bit) and int(ds.get("BitsStored", 8)) > 8:
        if GDCM12_PLUGIN not in decoder.available_plugins:
            raise TranscodeError(
                f"cannot transcode {where}: 12-bit JPEG needs python-gdcm, which is not installed"
            )
        # pydicom's plugins refuse 12-bit samples; asking them first only logs their refusals.
        plugin = GDCM12_PLUGIN
    options: dict[str, Any] = {"as_rgb": False}  # converted below, one frame at a time
    try:
        arr, pixel = decoder.as_array(ds, decoding_plugin=plugin, **options)
    except Exception as exc:
        reason = " ".join(str(exc).split())
        raise TranscodeError(f"cannot transcode {where}: decoding failed: {reason}") from exc
    photometric = str(pixel["photometric_interpretation"])
    if photometric in ("YBR_FULL", "YBR_FULL_422") and stored in LOSSY_JPEG:
        # Lossy JPEG YCbCr to RGB, as pydicom and DCMTK do (lossless data keeps its colour
        # space: a conversion would round).
        for frame in arr.reshape(-1, *arr.shape[-3:]):
            frame[...] = convert_color_space(frame, "YBR_FULL", "RGB")
        photometric = "RGB"
    elif photometric == "YBR_FULL_422":
        photometric = "YBR_FULL"  # decoded chroma is full size; native 422 would be subsampled
    if arr.dtype.itemsize * 8 < bits and arr.dtype.kind in "iu":
        # A plugin may size its output by the codestream's precision (J2K at 8 bits or less in
        # 16 bits allocated): widen to the container the data set declares, values unchanged.
        arr = arr.astype(f"{arr.dtype.kind}{bits // 8}")
    if arr.dtype.itemsize * 8 != bits:
        raise TranscodeError(
            f"cannot transcode {where}: decoded samples are {arr.dtype.itemsize * 8}-bit, Bits "
            f"Allocated is {bits}"
        )
    data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
    del arr  # frees the decoder's buffer: the decoded pixels now live once, in ``data``
    if len(data) % 2:
        data += b"\x00"
    elem = ds["PixelData"]
    elem.value = data
    elem.VR = VR.OB if bits <= 8 else VR.OW
    elem.is_undefined_length = False
    # Encapsulated-only elements (PS3.5 A.4): offsets into fragments that are gone.
    for tag in (0x7FE00001, 0x7FE00002):
        if tag in ds:
            del ds[tag]
    ds.PhotometricInterpretation = photometric
    if int(ds.get("SamplesPerPixel", 1)) > 1:
        ds.PlanarConfiguration = pixel.get("planar_configuration", 0)
    frames = int(pixel.get("number_of_frames", 1))
    if "NumberOfFrames" in ds or frames > 1:
        ds.NumberOfFrames = frames
    _check_pixel_length(ds, where)
    if is_lossy(stored) and "LossyImageCompression" not in ds:
        ds.LossyImageCompression = "01"


def _check_pixel_length(ds: Dataset, where: str) -> None:
    """The decoded pixel data must be exactly what the Image Pixel module describes."""
    bits = int(ds.BitsAllocated)
    count = (
        int(ds.Rows)
        * int(ds.Columns)
        * int(ds.get("SamplesPerPixel", 1))
        * int(ds.get("NumberOfFrames", 1) or 1)
    )
    expected = (count * bits + 7) // 8
    actual = len(ds.PixelData)
    if actual not in (expected, expected + 1):
        raise TranscodeError(
            f"cannot transcode {where}: decoded pixel data has {actual} bytes, the image pixel "
            f"attributes describe {expected}"
        )


# --- a pydicom decoder plugin: 12-bit JPEG Extended through GDCM --------------------------------
#
# pydicom 3.0's GDCM and Pillow plugins refuse JPEG Extended with 12-bit samples and the one that
# decodes it (pylibjpeg-libjpeg) is GPL-3.0. GDCM ships IJG libjpeg built for 8, 12 and 16 bits and
# decodes these frames (it first tries its 16-bit build and prints "Unsupported JPEG data precision
# 12" on stderr before retrying with the 12-bit one). The plugin follows pydicom's GDCM plugin
# (pydicom/pixels/decoders/gdcm.py, MIT) without the 12-bit refusal. Registered below under
# GDCM12_PLUGIN for JPEG Extended only.

GDCM12_PLUGIN = "dicomnode-gdcm12"
DECODER_DEPENDENCIES: Mapping[UID, tuple[str, ...]] = {JPEGExtended12Bit: ("python-gdcm",)}


def is_available(uid: str) -> bool:
    """pydicom's plugin interface: whether the plugin can decode syntax ``uid`` here."""
    return uid == JPEGExtended12Bit and importlib.util.find_spec("gdcm") is not None


def _decode_jpeg12_gdcm(src: bytes, runner: DecodeRunner) -> bytes:
    """pydicom's decoder interface: one encoded JPEG Extended frame in, its decoded bytes out."""
    gdcm: Any = importlib.import_module("gdcm")
    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(src)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    elem = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    elem.SetValue(fragments.__ref__())

    img = gdcm.Image()
    img.SetNumberOfDimensions(2)
    img.SetDimensions((runner.columns, runner.rows, 1))
    img.SetDataElement(elem)
    pi_type = gdcm.PhotometricInterpretation.GetPIType(str(runner.photometric_interpretation))
    img.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(pi_type))
    if runner.samples_per_pixel > 1:
        img.SetPlanarConfiguration(runner.planar_configuration)
    img.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGExtendedProcess2_4))
    bits_stored = runner.bits_stored
    img.SetPixelFormat(
        gdcm.PixelFormat(
            runner.samples_per_pixel,
            runner.bits_allocated,
            bits_stored,
            bits_stored - 1,
            runner.pixel_representation,
        )
    )
    buffer = img.GetBuffer()
    if buffer is None:
        raise RuntimeError("GDCM could not decode the 12-bit JPEG frame")
    # GDCM hands back char* as str: re-encode it to the original bytes
    frame: bytes = buffer.encode("utf-8", "surrogateescape")
    expected = runner.rows * runner.columns * runner.samples_per_pixel * runner.bits_allocated // 8
    if len(frame) != expected:
        raise RuntimeError(
            f"GDCM decoded {len(frame)} bytes for a 12-bit JPEG frame of {expected} bytes"
        )
    return frame


def register_decoders() -> None:
    """Add the 12-bit JPEG plugin to pydicom's decoder (idempotent). Done on first use, not at
    import: importing this module changes nothing in pydicom."""
    decoder = get_decoder(JPEGExtended12Bit)
    if GDCM12_PLUGIN in decoder.available_plugins or GDCM12_PLUGIN in getattr(
        decoder, "_available", {}
    ):
        return
    with contextlib.suppress(ValueError):  # registered by another thread meanwhile
        decoder.add_plugin(GDCM12_PLUGIN, (__name__, "_decode_jpeg12_gdcm"))
