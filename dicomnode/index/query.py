"""C-FIND identifiers to SQL: matching per PS3.4 C.2.2.2 over the index, answers as data sets.

The identifier is checked against the information model's hierarchy (PS3.4 C.4.1.2.2, C.6.1/2):
the query level must belong to the model, and the unique key of every level above it must be a
single value. Each key then matches as its kind in ``attributes.ATTRIBUTES`` says:

- universal (empty value): matches everything, the value is returned;
- single value; list of UIDs (``a\\b``) for UIDs; wildcards ``*`` and ``?`` for text and names,
  where every other character is literal (SQL GLOB, parameters bound, ``[`` escaped);
- ranges for dates and times (``20240101-``, ``-20240131``, ``20240101-20240131``); StudyDate
  and StudyTime each match on their own (C.2.2.2.5.1: a combined date-time range is only for
  callers that negotiate it by SOP Class Extended Negotiation, which the node does not offer);
- person names case-insensitively by default, per component group (a query without ``=`` may
  match the alphabetic, ideographic or phonetic group).

Every key asked for is returned, empty when the index does not hold it. Keys of a level below the
query level are not matched on and come back empty (as Orthanc does), not refused.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import peewee as pw
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag

from dicomnode.index.attributes import (
    BY_KEYWORD,
    LEVEL_ORDER,
    UNIQUE_KEY,
    Attribute,
    Kind,
    fold,
    name_groups,
    pad_time,
    text_value,
)
from dicomnode.index.models import Instance, Patient, PersonName, Series, Study
from dicomnode.qr import LEVELS, Level, Model

_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


_TABLE: dict[Level, Any] = {
    Level.PATIENT: Patient,
    Level.STUDY: Study,
    Level.SERIES: Series,
    Level.IMAGE: Instance,
}


def shown(label: str, value: str) -> str:
    """``value`` quoted for a :class:`QueryError`'s reason, which the node logs at WARNING;
    for a key holding patient data (a Patient... keyword, a person's name) only that it was
    withheld: no patient names, IDs or birth dates in the operational log (issue 6; the audit
    trail records who asked)."""
    keyword = label.rsplit(".", 1)[-1]
    try:
        vr = dictionary_VR(keyword)
    except KeyError:
        vr = ""
    if not value:
        return "none"
    if keyword.startswith(("Patient", "OtherPatient", "IssuerOfPatient")) or vr == "PN":
        return "a value (withheld from the log: patient data)"
    return repr(value)


class QueryError(ValueError):
    """An identifier that cannot be answered; ``hierarchy`` tells which failure status fits."""

    def __init__(self, reason: str, *, hierarchy: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hierarchy = hierarchy  # True: does not match the model; False: cannot process


@dataclass
class Query:
    """A validated C-FIND request: level, model, the keys to match and the keys to return."""

    model: Model
    level: Level
    identifier: Dataset
    matches: list[tuple[Attribute, Any]] = field(default_factory=list)
    case_sensitive_names: bool = False
    # The match that drives the SQL (see _where), once chosen; -1 until then, None for none.
    driver: int | None = -1


def parse(
    identifier: Dataset, model: Model, case_sensitive_names: bool = False, retrieve: bool = False
) -> Query:
    """Validate ``identifier`` for ``model`` and collect its matching keys.

    For a retrieval (C-MOVE, C-GET; PS3.4 C.4.2.2.1) only unique keys count: that of the
    retrieval level must be present (one UID or a list), and other keys are ignored.
    """
    raw_level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    levels = LEVELS[model]
    if raw_level not in {lv.value for lv in levels}:
        allowed = ", ".join(lv.value for lv in levels)
        raise QueryError(
            f"Query/Retrieve Level {raw_level or '(missing)'!r} is not one of {allowed} "
            f"for the {model.value} root model",
            hierarchy=True,
        )
    level = Level(raw_level)
    query = Query(model, level, identifier, case_sensitive_names=case_sensitive_names)
    depth = LEVEL_ORDER.index(level)
    # PS3.4 C.4.1.2.2.1: below the top level, the unique key of each level above the query level
    # is a single value (Study Root has no patient level, so its study queries need none).
    for upper in LEVEL_ORDER[LEVEL_ORDER.index(levels[0]) : depth]:
        key = UNIQUE_KEY[upper]
        value = text_value(identifier.get(key.keyword))
        if not value or "\\" in value or "*" in value or "?" in value:
            raise QueryError(
                f"a {level.value} query must carry a single {key.keyword} "
                f"(the unique key of the {upper.value} level), got {shown(key.keyword, value)}",
                hierarchy=True,
            )
    if retrieve:
        key = UNIQUE_KEY[level]
        value = text_value(identifier.get(key.keyword))
        if not value or "*" in value or "?" in value:
            raise QueryError(
                f"a {level.value} retrieval must name what to retrieve by {key.keyword} "
                f"(one value or a list), got {shown(key.keyword, value)}",
                hierarchy=True,
            )
    for elem in identifier:
        if elem.tag.group in (0x0000, 0x0002) or elem.keyword in ("QueryRetrieveLevel",):
            continue
        attr = BY_KEYWORD.get(elem.keyword or "")
        if attr is None or LEVEL_ORDER.index(attr.level) > depth:
            continue  # returned empty, not matched
        if retrieve and not attr.unique_key:
            continue
        if elem.VR == "SQ":
            continue  # we hold no sequences: universal match
        value = text_value(elem.value)
        if value in ("", "*"):
            continue  # universal match (PS3.4 C.2.2.2.3)
        query.matches.append((attr, _check_value(attr, value)))
    return query


def _check_value(attr: Attribute, value: str) -> str:
    if attr.kind in (Kind.UID, Kind.UID_LIST):
        for uid in value.split("\\"):
            if not _UID.fullmatch(uid) or len(uid) > 64:
                raise QueryError(
                    f"{attr.keyword}: {uid!r} is not a UID; UID keys match single values or "
                    "lists of UIDs, never wildcards (PS3.4 C.2.2.2.2)",
                    hierarchy=False,
                )
    elif attr.kind in (Kind.DATE, Kind.TIME):
        _range(attr, value)  # raises on a malformed range
    elif attr.kind in (Kind.INTEGER, Kind.COUNT) and not value.lstrip("+-").isdigit():
        raise QueryError(
            f"{attr.keyword}: {shown(attr.keyword, value)} is not an integer", hierarchy=False
        )
    return value


# --- matching ----------------------------------------------------------------------------------


def glob_pattern(value: str) -> str:
    """A DICOM wildcard value as a SQLite GLOB pattern: ``*`` and ``?`` keep their meaning, every
    other character is literal (GLOB has no escape character; ``[`` is written ``[[]``)."""
    return value.replace("[", "[[]")


def _range(attr: Attribute, value: str) -> tuple[str, str]:
    return date_time_range(attr.keyword, "DA" if attr.kind is Kind.DATE else "TM", value)


def date_time_range(label: str, vr: str, value: str) -> tuple[str, str]:
    """A DA or TM range (PS3.4 C.2.2.2.5: ``A-B``, ``A-``, ``-B``, or one value) as (low, high)
    inclusive, comparable as strings (times padded by ``pad_time``); raises :class:`QueryError`
    naming ``label`` for a malformed one."""
    low, dash, high = value.partition("-")
    if not dash:
        high = low
    if not low and not high:
        raise QueryError(f"{label}: {shown(label, value)} is an empty range", hierarchy=False)
    if vr == "DA":
        for part in (low, high):
            if part and (len(part) != 8 or not part.isdigit()):
                raise QueryError(
                    f"{label}: {shown(label, value)} is not a date or date range (YYYYMMDD, "
                    "YYYYMMDD-, -YYYYMMDD, YYYYMMDD-YYYYMMDD; PS3.4 C.2.2.2.5)",
                    hierarchy=False,
                )
        return low or "00000000", high or "99999999"
    lo, hi = pad_time(low, "0"), pad_time(high, "9")
    if not lo or not hi:
        raise QueryError(
            f"{label}: {shown(label, value)} is not a time or time range", hierarchy=False
        )
    return lo, hi


def _column(attr: Attribute, indexed: bool = True) -> Any:
    column = getattr(_TABLE[attr.level], attr.column)
    # SQLite uses no index for ``+column`` (the unary plus is otherwise a no-op).
    return column if indexed else pw.NodeList((pw.SQL("+"), column), glue="")


def _condition(query: Query, attr: Attribute, value: str, indexed: bool = True) -> Any:
    """The SQL condition of one match. ``indexed=False`` writes it so that SQLite cannot drive
    the query from it (a unary ``+`` on the column, a correlated EXISTS for names): it is then
    checked on the rows another, more selective key found (see :func:`_where`)."""
    kind = attr.kind
    if kind is Kind.UID:
        uids = value.split("\\")
        column = _column(attr)
        return column == uids[0] if len(uids) == 1 else column.in_(uids)
    if kind is Kind.PERSON_NAME:
        return _name_condition(query, attr, value, indexed)
    if kind is Kind.DATE:
        low, high = _range(attr, value)
        return _column(attr, indexed).between(low, high)
    if kind is Kind.TIME:
        low, high = _range(attr, value)
        # Times compare in the normalised date-time; the date part is any date.
        return pw.fn.substr(Study.study_datetime, 9).between(low, high)
    if kind is Kind.INTEGER:
        return _column(attr) == int(value)
    if kind is Kind.MODALITIES:
        # PS3.4 C.6.1.1.3: a study matches when any of its modalities matches any value given.
        wrapped = pw.fn.printf("\\%s\\", Study.modalities)
        return _any(_glob(wrapped, f"*\\{m}\\*") for m in value.split("\\"))
    if kind is Kind.UID_LIST:
        # Checked per candidate study through its series and instances (indexed joins); an
        # IN over every instance of that SOP class would read the whole instance table.
        SeriesQ, InstanceQ = Series.alias("sc"), Instance.alias("ic")
        return pw.fn.EXISTS(
            InstanceQ.select(pw.SQL("1"))
            .join(SeriesQ, on=InstanceQ.series == SeriesQ.id)
            .where((SeriesQ.study == Study.id) & InstanceQ.sop_class_uid.in_(value.split("\\")))
        )
    if kind is Kind.COUNT:
        return _count(attr) == int(value)
    column = _column(attr, indexed)
    return column == value if not _has_wildcard(value) else _glob(column, value)


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def _glob(column: Any, value: str) -> Any:
    return pw.Expression(column, "GLOB", glob_pattern(value))


def _name_condition(query: Query, attr: Attribute, value: str, indexed: bool = True) -> Any:
    """Person names per component group, through the person_name keys (see models.PersonName):
    ``owner IN (names matching)`` when the names drive the query, else a correlated EXISTS on
    the candidate's own names (index person_name(keyword, owner))."""
    owner = Patient.id if attr.level is Level.PATIENT else Study.id
    conditions: list[Any] = []
    for sub in _name_keys(query, attr, value, indexed):
        if indexed:
            conditions.append(owner.in_(sub))
        else:
            conditions.append(pw.fn.EXISTS(sub.where(PersonName.owner == owner)))
    return _all(conditions)


def _name_keys(query: Query, attr: Attribute, value: str, indexed: bool = True) -> list[Any]:
    """One select of matching person_name owners per component group the value constrains;
    ``indexed=False`` keeps SQLite off the (keyword, folded) index, for a correlated look-up by
    owner instead."""
    groups = name_groups(value)
    folded_column = (
        PersonName.folded if indexed else pw.NodeList((pw.SQL("+"), PersonName.folded), glue="")
    )
    subs = []
    for index, group in enumerate(groups):
        if not group or (len(groups) > 1 and group == "*"):
            continue
        folded = fold(group)
        sub = PersonName.select(PersonName.owner).where(PersonName.keyword == attr.keyword)
        if len(groups) > 1:  # a query with "=" matches group by group
            sub = sub.where(PersonName.group == index)
        sub = sub.where(
            _glob(folded_column, folded) if _has_wildcard(folded) else folded_column == folded
        )
        if query.case_sensitive_names:
            sub = sub.where(
                _glob(PersonName.value, group)
                if _has_wildcard(group)
                else PersonName.value == group
            )
        subs.append(sub)
    return subs


# --- choosing the driving key ------------------------------------------------------------------

# Columns with an index whose leading column they are (models.py): a match on one of them can
# drive the query. UIDs are unique and always drive; person names go through person_name.
_INDEXED = frozenset({"patient_id", "birth_date", "study_date", "accession_number", "modality"})
# How far a probe counts the index entries of one key before it stops: past this, a key is
# "broad" and any narrower key drives.
PROBE_LIMIT = 256


def _can_drive(attr: Attribute, value: str) -> bool:
    if attr.kind is Kind.PERSON_NAME:
        return any(not g.startswith(("*", "?")) for g in name_groups(value) if g)
    if attr.kind is Kind.DATE:
        return attr.column in _INDEXED
    if attr.kind is Kind.TEXT:
        return attr.column in _INDEXED and not value.startswith(("*", "?"))
    return False


def _probe(query: Query, attr: Attribute, value: str) -> int:
    """How many index entries match ``attr`` (up to PROBE_LIMIT): a bounded index range count."""
    if attr.kind is Kind.PERSON_NAME:
        subs = _name_keys(query, attr, value)
        return min(int(sub.limit(PROBE_LIMIT).count()) for sub in subs) if subs else PROBE_LIMIT
    table = _TABLE[attr.level]
    sub = table.select(pw.SQL("1")).where(_condition(query, attr, value)).limit(PROBE_LIMIT)
    return int(sub.count())


def _where(query: Query) -> Any:
    """The WHERE condition of ``query``, written so that SQLite drives from the most selective
    indexed key.

    Without statistics SQLite guesses how many rows a range or an ``IN (names)`` yields, and may
    walk a broad one (``PatientName=B*``: every twentieth patient) while a narrow one (a three-day
    StudyDate range) sits beside it. When two or more non-unique indexed keys are given, each is
    probed (a count of its index entries, stopping at PROBE_LIMIT); the narrowest drives and the
    others are written so that no index serves them. With a UID key SQLite already starts there.
    """
    if query.driver == -1:
        query.driver = None
        has_uid = any(attr.kind is Kind.UID for attr, _ in query.matches)
        candidates = [i for i, (attr, value) in enumerate(query.matches) if _can_drive(attr, value)]
        if not has_uid and len(candidates) > 1:
            counts = {i: _probe(query, *query.matches[i]) for i in candidates}
            query.driver = min(candidates, key=lambda i: counts[i])
    return _all(
        _condition(query, attr, value, indexed=query.driver in (None, i))
        for i, (attr, value) in enumerate(query.matches)
    )


def _any(conditions: Iterable[Any]) -> Any:
    result = None
    for condition in conditions:
        result = condition if result is None else result | condition
    return result


def _all(conditions: Iterable[Any]) -> Any:
    result = None
    for condition in conditions:
        if condition is not None:
            result = condition if result is None else result & condition
    return result


_COUNTED = {
    "Studies": (Study, Study.patient),
    "Series": (Series, Study.patient),
    "Instances": (Instance, Study.patient),
}


def _count(attr: Attribute) -> Any:
    """The correlated sub-query that answers a NumberOf...Related... key (PS3.4 C.6.1.1.2-4)."""
    what = attr.keyword.removeprefix("NumberOf").split("Related")[1]
    owner = {Level.PATIENT: Patient.id, Level.STUDY: Study.id, Level.SERIES: Series.id}[attr.level]
    StudyQ, SeriesQ, InstanceQ = Study.alias("sq"), Series.alias("se"), Instance.alias("iq")
    sub: Any
    if what == "Studies":
        sub = StudyQ.select(pw.fn.COUNT(StudyQ.id)).where(StudyQ.patient == owner)
    elif what == "Series":
        sub = SeriesQ.select(pw.fn.COUNT(SeriesQ.id)).join(StudyQ, on=SeriesQ.study == StudyQ.id)
        sub = sub.where(
            (StudyQ.patient == owner) if attr.level is Level.PATIENT else (SeriesQ.study == owner)
        )
    else:
        sub = (
            InstanceQ.select(pw.fn.COUNT(InstanceQ.id))
            .join(SeriesQ, on=InstanceQ.series == SeriesQ.id)
            .join(StudyQ, on=SeriesQ.study == StudyQ.id)
        )
        where = {
            Level.PATIENT: StudyQ.patient == owner,
            Level.STUDY: SeriesQ.study == owner,
            Level.SERIES: InstanceQ.series == owner,
        }[attr.level]
        sub = sub.where(where)
    return sub


# --- answering -----------------------------------------------------------------------------


def run(query: Query, limit: int | None = None) -> Iterator[Dataset]:
    """The matches of ``query`` as C-FIND response identifiers, streamed from the database.

    ``limit`` stops after that many (the caller checks the cap with :func:`count` first).
    """
    select, returned = _select(query)
    if limit is not None:
        select = select.limit(limit)
    template = _template(query, returned)
    for row in select.dicts().iterator():
        yield _answer(template, row)


@dataclass(frozen=True)
class StoredInstance:
    """One instance to send in a retrieval: its file and what a C-STORE needs to name it."""

    path: str  # relative to storage_dir
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    study_uid: str = ""  # for the audit trail's record of what a retrieval sent


def instances(query: Query) -> list[StoredInstance]:
    """Every stored instance under the entities ``query`` matches (its level and below)."""
    select: Any = (
        Instance.select(
            Instance.path, Instance.sop_class_uid, Instance.sop_instance_uid,
            Instance.transfer_syntax, Study.study_uid,
        )
        .join_from(Instance, Series)
        .join_from(Series, Study)
        .join_from(Study, Patient)
    )  # fmt: skip
    condition = _where(query)
    if condition is not None:
        select = select.where(condition)
    order = (Study.id, Series.series_number, Instance.instance_number, Instance.id)
    return [
        StoredInstance(
            r["path"],
            r["sop_class_uid"],
            r["sop_instance_uid"],
            r["transfer_syntax"],
            r["study_uid"],
        )
        for r in select.order_by(*order).dicts()
    ]


def count(query: Query, cap: int) -> int:
    """How many matches ``query`` has, counting no further than ``cap + 1``."""
    select, _ = _select(query, columns=False)
    return int(select.limit(cap + 1).count())


def _select(query: Query, columns: bool = True) -> tuple[Any, dict[str, Attribute]]:
    depth = LEVEL_ORDER.index(query.level)
    table = _TABLE[query.level]
    returned: dict[str, Attribute] = {}
    fields: list[Any] = [table.id.alias("_id")]
    if columns:
        for elem in query.identifier:
            attr = BY_KEYWORD.get(elem.keyword or "")
            if attr is None or LEVEL_ORDER.index(attr.level) > depth:
                continue
            alias = f"k_{attr.keyword}"
            returned[alias] = attr
            if attr.kind is Kind.COUNT:
                fields.append(_count(attr).alias(alias))
            elif attr.kind is Kind.UID_LIST:
                fields.append(_sop_class_list().alias(alias))
            else:
                fields.append(_column(attr).alias(alias))
    select = table.select(*fields)
    # Join upwards: Instance -> Series -> Study -> Patient, as far as the level needs.
    chain = [Instance, Series, Study, Patient][3 - depth :]
    for child, parent in itertools.pairwise(chain):
        select = select.join_from(child, parent)
    condition = _where(query)
    if condition is not None:
        select = select.where(condition)
    return select.order_by(table.id), returned


def _sop_class_list() -> Any:
    SeriesQ, InstanceQ = Series.alias("se2"), Instance.alias("iq2")
    distinct = (
        InstanceQ.select(InstanceQ.sop_class_uid.alias("uid"))
        .join(SeriesQ, on=InstanceQ.series == SeriesQ.id)
        .where(SeriesQ.study == Study.id)
        .distinct()
    )
    return pw.Select([distinct.alias("d")], [pw.fn.group_concat(pw.SQL("d.uid"), "\\")])


@dataclass(frozen=True)
class _Template:
    """The shape of every answer to one query, worked out once: per element of the request,
    either a ready empty/fixed element or the column alias whose value fills it."""

    slots: tuple[tuple[BaseTag, str, str, RawDataElement | None], ...]
    asked_utf8: bool


def _template(query: Query, returned: dict[str, Attribute]) -> _Template:
    slots: list[tuple[BaseTag, str, str, RawDataElement | None]] = []
    for elem in query.identifier:
        tag = elem.tag
        if tag.group in (0x0000, 0x0002) or tag == _CHARSET_TAG:
            continue
        keyword = elem.keyword or keyword_for_tag(tag)
        vr = elem.VR if elem.VR not in ("UN", None) else _vr(tag)
        alias = f"k_{keyword}"
        if keyword == "QueryRetrieveLevel":
            slots.append((tag, "CS", "", raw_element(tag, "CS", query.level.value)))
        elif alias in returned:
            # A value of ours: the dictionary's VR, whatever the request said.
            slots.append((tag, _vr(tag), alias, None))
        else:
            slots.append((tag, vr, "", raw_element(tag, vr, "")))
    asked = query.identifier.get("SpecificCharacterSet")
    asked_utf8 = asked is not None and "ISO_IR 192" in text_value(asked)
    return _Template(tuple(slots), asked_utf8)


def _answer(template: _Template, row: dict[str, Any]) -> Dataset:
    """One response identifier: every key of the request, ours filled in, others empty.

    The elements are built already encoded (pydicom raw elements: text in UTF-8 or ASCII,
    padded to even length as PS3.5 7.1 says; every value we return is text, or empty), so that
    neither building nor writing one converts values element by element; see
    :func:`for_transfer_syntax`. Read like any data set, they decode on access.
    """
    elements: dict[BaseTag, DataElement | RawDataElement] = {}
    needs_utf8 = template.asked_utf8
    for tag, vr, alias, fixed in template.slots:
        if fixed is not None:
            elements[tag] = fixed
            continue
        value = row[alias]
        if value is None:
            text = ""
        elif isinstance(value, int):
            text = str(value)
        else:
            text = str(value)
            if "\\" in text:  # multiple values (ModalitiesInStudy): no empty ones
                text = "\\".join(v for v in text.split("\\") if v)
            needs_utf8 = needs_utf8 or not text.isascii()
        elements[tag] = raw_element(tag, vr, text)
    if needs_utf8:
        # PS3.5 6.1.2.3: UTF-8 carries every character we hold, whatever the query used.
        elements[_CHARSET_TAG] = _UTF8
    rsp = Dataset(elements)
    rsp.set_original_encoding(None, None, _UTF8_ENCODINGS if needs_utf8 else default_encoding)
    return rsp


_CHARSET_TAG = Tag(0x00080005)


def raw_element(tag: BaseTag, vr: str, text: str) -> RawDataElement:
    """An element holding ``text`` encoded (UTF-8, which is ASCII for ASCII text) and padded to
    even length: UIs with NUL, other text with a space (PS3.5 6.2). ``vr`` may be an ambiguous
    dictionary VR ("US or SS") only for an empty value, written as its first choice."""
    data = text.encode("utf-8")
    if len(data) % 2:
        data += b"\x00" if vr == "UI" else b" "
    return RawDataElement(tag, vr.split(" or ")[0], len(data), data, 0, False, True)


_UTF8 = raw_element(_CHARSET_TAG, "CS", "ISO_IR 192")
_UTF8_ENCODINGS = convert_encodings("ISO_IR 192")


def for_transfer_syntax(answer: Dataset, implicit_vr: bool, little_endian: bool) -> Dataset:
    """Mark an answer of :func:`run` as encoded for the negotiated transfer syntax, so that
    writing it (pynetdicom's ``encode``) copies the raw element values as they are instead of
    decoding and re-encoding each; text values are the same bytes in every transfer syntax."""
    answer.set_original_encoding(implicit_vr, little_endian, answer.original_character_set)
    return answer


def _vr(tag: Any) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return "UN"
