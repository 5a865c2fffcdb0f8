"""The Modality Worklist (PS3.4 K.6): items in, checked and normalised; queries answered.

A worklist item is one Scheduled Procedure Step with its requested procedure, imaging service
request, visit and patient. Items come from ``dicomnode worklist add`` (YAML or JSON with DICOM
keywords, DICOM JSON, or command-line flags) and ``dicomnode worklist import`` (DICOM worklist
files, as DCMTK ``wlmscpfs`` and Orthanc read them). Whatever their source, an item is checked
here (the attributes a modality needs, valid dates, times and UIDs), decoded to Unicode and held
in the index as a data set with UTF-8 text plus the columns queries narrow on. An item with
several steps becomes one item per step, as each C-FIND answer carries one step (K.6.1.2.2).

:class:`Worklist` is the worklist over an open :class:`~dicomnode.index.Index`; it imports no
pynetdicom. The C-FIND handler and the ``dicomnode worklist`` commands both use it.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import re
import secrets
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import yaml
from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset, read_preamble
from pydicom.filewriter import write_dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pydicom.valuerep import validate_value

from dicomnode.config import Config, WorklistScope, valid_ae_title
from dicomnode.encoding import EncodingError, check_dataset
from dicomnode.index import Index, IndexError_
from dicomnode.index.attributes import STEP_SEQUENCE, WORKLIST_ATTRIBUTES, text_value
from dicomnode.index.models import WorklistItem
from dicomnode.index.worklist import COMPLETED, answer, matches, narrowing, parse
from dicomnode.policy import is_valid_uid
from dicomnode.qr import MODALITY_WORKLIST_FIND

__all__ = ["MODALITY_WORKLIST_FIND", "TooManyItems", "Worklist", "WorklistError"]

log = logging.getLogger(__name__)

SCHEDULED = "SCHEDULED"
# Attributes an item must carry with a value: what a modality needs to identify the patient and
# find its step (Return Key Type 1 in PS3.4 Table K.6-1); the other Type 1 keys are generated.
REQUIRED = ("PatientName", "PatientID")
REQUIRED_IN_STEP = (
    "Modality",
    "ScheduledProcedureStepStartDate",
    "ScheduledProcedureStepStartTime",
)
# How long an expiry pass is good for, while queries come in.
EXPIRY_INTERVAL = dt.timedelta(hours=1)
# A worklist file is a small data set; anything larger is not one (bounds what import reads).
MAX_FILE_SIZE = 16 * 1024**2
_UTF8 = "ISO_IR 192"
_CHARSET = Tag(0x00080005)
_STEP_TAG = Tag(STEP_SEQUENCE)


class WorklistError(ValueError):
    """An item (or a file of items) that cannot be added; the message says where and why."""


class TooManyItems(Exception):
    """A worklist query matched more than ``query.max_matches`` items; nothing was answered."""


# --- items in -----------------------------------------------------------------------------------


def item_from_mapping(data: Any, where: str) -> Dataset:
    """A data set from a mapping of DICOM keywords (or ``gggg,eeee`` tags) to values; sequences
    are lists of such mappings. DICOM JSON (PS3.18 F.2: tags as ``GGGGEEEE`` keys) is read as
    such. Every value is checked against its VR. Text is Unicode (UTF-8 in the file)."""
    if (
        isinstance(data, Mapping)
        and data
        and all(isinstance(k, str) and len(k) == 8 and _is_hex(k) for k in data)
    ):
        try:
            ds = Dataset.from_json(dict(data))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise WorklistError(f"{where}: not valid DICOM JSON: {exc}") from exc
    else:
        ds = _from_keywords(data, where)
    ds[_CHARSET] = DataElement(_CHARSET, "CS", _UTF8)
    return ds


def _from_keywords(data: Any, where: str) -> Dataset:
    if not isinstance(data, Mapping) or not data:
        raise WorklistError(f"{where}: an item is a mapping of DICOM keywords to values")
    ds = Dataset()
    for name, value in data.items():
        here = f"{where}: {name}"
        tag = _tag(name, here)
        vr = str(dictionary_VR(tag)).split(" or ")[0]
        if vr == "SQ":
            items = value if isinstance(value, list) else [value] if value else []
            ds[tag] = DataElement(
                tag,
                "SQ",
                Sequence(_from_keywords(v, f"{here}[{i}]") for i, v in enumerate(items)),
            )
            continue
        ds[tag] = DataElement(tag, vr, _value(vr, value, here))
    return ds


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True


def _tag(name: Any, where: str) -> Any:
    if not isinstance(name, str):
        raise WorklistError(f"{where}: keys are DICOM keywords such as PatientName")
    text = name.strip().strip("()")
    if "," in text and _is_hex(text.replace(",", "")) and len(text) == 9:
        group, element = text.split(",")
        tag = Tag(int(group, 16), int(element, 16))
    else:
        number = tag_for_keyword(text)
        if number is None:
            raise WorklistError(f"{where}: not a DICOM keyword (e.g. PatientName, Modality)")
        tag = Tag(number)
    try:
        dictionary_VR(tag)
    except KeyError:
        raise WorklistError(f"{where}: not in the DICOM data dictionary") from None
    if tag.group in (0x0000, 0x0002) or tag.element == 0:
        raise WorklistError(f"{where}: command and file meta attributes are not item attributes")
    return tag


def _value(vr: str, value: Any, where: str) -> Any:
    if value is None or value == "":
        return None
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str | int | float) and not isinstance(v, bool) for v in values):
        raise WorklistError(f"{where}: values are text or numbers, or lists of them")
    written = [str(v).strip() for v in values]
    texts = written
    if vr == "DA":  # 2026-12-02 as people write it; DICOM has 20261202 (PS3.5 6.2)
        texts = [_ISO_DATE.sub(r"\1\2\3", t) for t in written]
    elif vr == "TM":  # 09:30 likewise
        texts = [t.replace(":", "") for t in written]
    try:
        if vr in ("US", "SS", "UL", "SL", "UV", "SV"):
            values = [int(t) for t in texts]
        elif vr in ("FL", "FD"):
            values = [float(t) for t in texts]
        else:
            values = texts
    except ValueError:
        raise WorklistError(f"{where}: {vr} takes numbers, got {value!r}") from None
    for as_written, v in zip(written, values, strict=True):
        try:
            validate_value(vr, v, pydicom_config.RAISE)
        except ValueError as exc:
            raise WorklistError(
                f"{where}: {as_written!r} is not a valid {vr} value ({exc})"
            ) from None
    return values if len(values) > 1 else values[0]


class _TextLoader(yaml.SafeLoader):
    """YAML with every plain scalar read as text: DICOM values are text, and YAML 1.1's implicit
    types would change them silently (PatientID 001234 is octal 668, 0930 a number, 2026-12-02
    a date, NO a boolean). Numbers for numeric VRs are converted by their VR."""


_TextLoader.yaml_implicit_resolvers = {}
# null, ~ and an empty value still mean "no value" (JSON's null too).
_TextLoader.add_implicit_resolver(
    "tag:yaml.org,2002:null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""]
)
_ISO_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$")


def items_from_text(text: str, where: str) -> list[Dataset]:
    """The items in a YAML or JSON document: one item, or a list of items."""
    try:
        data = yaml.load(text, Loader=_TextLoader)  # noqa: S506 - a SafeLoader; JSON is YAML
    except yaml.YAMLError as exc:
        raise WorklistError(f"{where}: neither YAML nor JSON: {exc}") from exc
    if isinstance(data, list):
        if not data:
            raise WorklistError(f"{where}: the list of items is empty")
        return [item_from_mapping(d, f"{where}[{i}]") for i, d in enumerate(data)]
    return [item_from_mapping(data, where)]


def read_worklist_file(path: Path) -> Dataset:
    """A DICOM worklist file (PS3.10, or a bare data set as ``dump2dcm`` writes without ``+F``),
    its encoding walked in full first so a cut or corrupt file is refused, not half read."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_SIZE:
            raise WorklistError(f"{path}: {size} bytes is too large for a worklist file")
        with path.open("rb") as fp:
            read_preamble(fp, force=True)
            syntax = _file_meta_syntax(fp, size)
            start = fp.tell()
            syntax = syntax or _guess_syntax(fp, start)
            if syntax == DeflatedExplicitVRLittleEndian:
                raise WorklistError(f"{path}: deflated worklist files are not supported")
            check_dataset(fp, start, size, syntax)
            fp.seek(start)
            ds = read_dataset(
                fp,
                is_implicit_VR=syntax == ImplicitVRLittleEndian,
                is_little_endian=syntax != ExplicitVRBigEndian,
            )
            decode_values(ds)
    except WorklistError:
        raise
    except EncodingError as exc:
        raise WorklistError(f"{path}: not a readable DICOM data set: {exc}") from exc
    except OSError as exc:
        raise WorklistError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except (ValueError, KeyError, TypeError, LookupError, AttributeError, struct.error) as exc:
        raise WorklistError(f"{path}: not a readable DICOM data set: {exc}") from exc
    if len(ds) == 0:
        raise WorklistError(f"{path}: holds no data set")
    return ds


_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"))


def _file_meta_syntax(fp: Any, size: int) -> str:
    """Skip the File Meta group (PS3.10 7.1: group 0002, explicit VR little endian) if there is
    one, leaving ``fp`` at the data set; returns its Transfer Syntax UID, or ""."""
    syntax = ""
    while True:
        position = fp.tell()
        header = fp.read(6)
        if len(header) < 6 or header[:2] != b"\x02\x00":
            fp.seek(position)
            return syntax
        vr = header[4:6]
        if vr in _LONG_VRS:
            fp.read(2)
            (length,) = struct.unpack("<I", fp.read(4))
        else:
            (length,) = struct.unpack("<H", fp.read(2))
        if fp.tell() + length > size:
            raise EncodingError(f"File Meta element at offset {position} runs past the end")
        value = fp.read(length)
        if header[2:4] == b"\x10\x00":  # (0002,0010) Transfer Syntax UID
            syntax = value.rstrip(b"\x00 ").decode("ascii", "replace")


def _guess_syntax(fp: Any, start: int) -> str:
    """Explicit or implicit VR little endian, by whether the first element has a VR."""
    fp.seek(start)
    header = fp.read(6)
    fp.seek(start)
    vr = header[4:6]
    return (
        str(ExplicitVRLittleEndian)
        if len(vr) == 2 and vr.isalpha() and vr.isupper()
        else str(ImplicitVRLittleEndian)
    )


def decode_values(ds: Dataset) -> None:
    """Decode every value now, by the data set's own character set, so that a value that
    cannot be decoded fails here, not in a query, and every text value is Unicode, ready to be
    written in UTF-8 (person names become plain text, forgetting their original bytes)."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                decode_values(item)
        elif elem.VR == "PN" and elem.value is not None:
            names = elem.value if isinstance(elem.value, MultiValue) else [elem.value]
            plain = [str(name) for name in names]
            elem.value = plain if len(plain) > 1 else plain[0]
        else:
            _ = elem.value


def normalise(ds: Dataset, where: str) -> list[Dataset]:
    """Check an item and return it as stored: text decoded to Unicode, one data set per
    Scheduled Procedure Step, missing identifiers generated (Study Instance UID, Requested
    Procedure ID, Scheduled Procedure Step ID) and the step's status SCHEDULED unless given."""
    item = copy.deepcopy(ds)
    try:
        decode_values(item)
    except (ValueError, LookupError, TypeError) as exc:
        raise WorklistError(f"{where}: text cannot be decoded: {exc}") from exc
    for elem in list(item):
        if elem.tag.group in (0x0000, 0x0002) or elem.tag.element == 0:
            del item[elem.tag]
    for keyword in REQUIRED:
        if not text_value(item.get(keyword)):
            raise WorklistError(f"{where}: {keyword} is required")
    steps = list(item.get(STEP_SEQUENCE) or [])
    if not steps:
        raise WorklistError(
            f"{where}: {STEP_SEQUENCE} is required, with one item per scheduled step "
            f"({', '.join(REQUIRED_IN_STEP)} at least)"
        )
    if not text_value(item.get("StudyInstanceUID")):
        # A 2.25 UID from a random UUID (PS3.5 B.2): no organisation root borrowed.
        item.StudyInstanceUID = generate_uid(prefix=None)
    if not text_value(item.get("RequestedProcedureID")):
        item.RequestedProcedureID = _new_id()
    _check_values(item, where)
    del item[_STEP_TAG]  # each step gets a copy of the rest, not of every other step
    result = []
    for i, step in enumerate(steps):
        here = f"{where}: {STEP_SEQUENCE}[{i}]"
        for keyword in REQUIRED_IN_STEP:
            if not text_value(step.get(keyword)):
                raise WorklistError(f"{here}: {keyword} is required")
        _check_values(step, here)
        one = copy.deepcopy(item)
        single = step
        if not text_value(single.get("ScheduledProcedureStepID")):
            single.ScheduledProcedureStepID = _new_id()
        if not text_value(single.get("ScheduledProcedureStepStatus")):
            single.ScheduledProcedureStepStatus = SCHEDULED
        one[_STEP_TAG] = DataElement(_STEP_TAG, "SQ", Sequence([single]))
        one[_CHARSET] = DataElement(_CHARSET, "CS", _UTF8)
        result.append(one)
    return result


def _new_id() -> str:
    """A fresh identifier for an SH value (16 characters at most): 12 random digits."""
    return str(secrets.randbelow(9 * 10**11) + 10**11)


def _check_values(ds: Dataset, where: str) -> None:
    for elem in ds:
        if elem.VR == "SQ" or elem.value in (None, ""):
            continue
        value = text_value(elem.value)
        label = f"{where}: {elem.keyword or elem.tag}"
        for part in value.split("\\"):
            if elem.VR == "DA" and not _valid_date(part):
                raise WorklistError(f"{label}: {part!r} is not a date (YYYYMMDD)")
            if elem.VR == "TM" and not _valid_time(part):
                raise WorklistError(f"{label}: {part!r} is not a time (HHMM, HHMMSS, ...)")
            if elem.VR == "UI" and not is_valid_uid(part):
                raise WorklistError(f"{label}: {part!r} is not a UID")
            if elem.VR == "AE" and not valid_ae_title(part):
                raise WorklistError(f"{label}: {part!r} is not an AE title")


def _valid_date(value: str) -> bool:
    try:
        dt.datetime.strptime(value, "%Y%m%d")
    except ValueError:
        return False
    return len(value) == 8


def _valid_time(value: str) -> bool:
    whole, _, fraction = value.replace(":", "").partition(".")
    if len(whole) not in (2, 4, 6) or not whole.isdigit() or (fraction and not fraction.isdigit()):
        return False
    parts = [int(whole[i : i + 2]) for i in range(0, len(whole), 2)]
    return parts[0] < 24 and all(p < 60 for p in parts[1:2]) and all(p < 61 for p in parts[2:])


# --- items stored ----------------------------------------------------------------------------


def encode(item: Dataset) -> bytes:
    """An item as stored in the index: Explicit VR Little Endian, its text in UTF-8."""
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_dataset(buffer, item)
    return buffer.getvalue()


def decode(data: bytes) -> Dataset:
    """An item as :func:`encode` wrote it."""
    return read_dataset(BytesIO(data), is_implicit_VR=False, is_little_endian=True)


def columns(item: Dataset) -> dict[str, str]:
    """The worklist_item column values of a normalised item (one step)."""
    step = item[_STEP_TAG].value[0]
    return {
        attr.column: text_value((step if attr.in_step else item).get(attr.keyword))
        for attr in WORKLIST_ATTRIBUTES
        if attr.column
    }


@dataclass(frozen=True)
class StoredItem:
    """A worklist item as the index holds it."""

    id: int
    item: Dataset
    mpps_uid: str
    created_at: str
    updated_at: str

    @classmethod
    def of(cls, row: Any) -> StoredItem:
        return cls(row.id, decode(bytes(row.dataset)), row.mpps_uid, row.created_at, row.updated_at)


# --- the worklist over the index -------------------------------------------------------------


class Worklist:
    """The worklist items of an open index, as the SCP and the commands use them."""

    def __init__(self, config: Config, index: Index) -> None:
        self.config = config
        self.index = index
        self._expired_at: dt.datetime | None = None

    def add(self, items: Iterable[Dataset]) -> list[int]:
        """Store normalised items (see :func:`normalise`), all or none; returns their ids."""
        now = _now()
        rows = [
            {**columns(item), "dataset": encode(item), "created_at": now, "updated_at": now}
            for item in items
        ]
        return self.index.add_worklist_items(rows)

    def items(self, ids: Iterable[int] | None = None) -> Iterator[StoredItem]:
        """Every item (or those with ``ids``), in scheduled order."""
        wanted = None if ids is None else WorklistItem.id.in_(list(ids))
        for row in self.index.worklist_rows(wanted):
            yield StoredItem.of(row)

    def remove(self, ids: Iterable[int]) -> int:
        return self.index.remove_worklist_items(WorklistItem.id.in_(list(ids)))

    def expire(self, today: dt.date | None = None) -> int:
        """Remove the items scheduled (else added) more than ``expire_after_days`` ago."""
        days = self.config.worklist.expire_after_days
        self._expired_at = dt.datetime.now(dt.UTC)
        if days == 0:
            return 0
        cutoff = (today or dt.date.today()) - dt.timedelta(days=days)
        condition = (
            (WorklistItem.start_date != "") & (WorklistItem.start_date < cutoff.strftime("%Y%m%d"))
        ) | ((WorklistItem.start_date == "") & (WorklistItem.created_at < cutoff.isoformat()))
        removed = self.index.remove_worklist_items(condition)
        if removed:
            log.info(
                "worklist: %d item(s) scheduled before %s expired (worklist.expire_after_days)",
                removed,
                cutoff.isoformat(),
            )
        return removed

    def find(self, identifier: Dataset, calling_ae_title: str) -> list[Dataset]:
        """The C-FIND answers for ``identifier`` from ``calling_ae_title`` (see
        :mod:`dicomnode.index.worklist`), all worked out before the first is sent.

        Raises :class:`~dicomnode.index.query.QueryError` for an identifier that cannot be
        answered and :class:`TooManyItems` past ``query.max_matches``.
        """
        if self._expired_at is None or dt.datetime.now(dt.UTC) - self._expired_at > (
            EXPIRY_INTERVAL
        ):
            try:
                self.expire()
            except IndexError_ as exc:  # the query can still be answered
                log.warning("worklist: expiring old items failed: %s", exc)
        query = parse(identifier, self.config.query.case_sensitive_names)
        station = query.step_key("ScheduledStationAETitle")
        if (station is None or station.matches_everything) and self.config.worklist_scope_for(
            calling_ae_title
        ) is WorklistScope.OWN:
            # Matched as a station key would be: one value of a multi-valued title will do.
            query.constrain_step("ScheduledStationAETitle", calling_ae_title)
        status = query.step_key("ScheduledProcedureStepStatus")
        if self.config.worklist.hide_completed and (status is None or status.matches_everything):
            query.conditions.append(WorklistItem.step_status != COMPLETED)
        cap = self.config.query.max_matches
        found: list[Dataset] = []
        for row in self.index.worklist_rows(narrowing(query)):
            item = decode(bytes(row.dataset))
            if not matches(query, item):
                continue
            if len(found) == cap:
                raise TooManyItems(
                    f"more than {cap} matching worklist items (query.max_matches); narrow the query"
                )
            found.append(answer(query, item))
        return found


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
