"""C-FIND identifiers to SQL: matching per PS3.4 C.2.2.2 over the index, answers as data sets.

The identifier is checked against the information model's hierarchy (PS3.4 C.4.1.2.2, C.6.1/2):
the query level must belong to the model, and the unique key of every level above it must be a
single value. Each key then matches as its kind in ``attributes.ATTRIBUTES`` says:

- universal (empty value): matches everything, the value is returned;
- single value; list of UIDs (``a\\b``) for UIDs; wildcards ``*`` and ``?`` for text and names,
  where every other character is literal (SQL GLOB, parameters bound, ``[`` escaped);
- ranges for dates and times (``20240101-``, ``-20240131``, ``20240101-20240131``), and StudyDate
  with StudyTime as one date-time range (C.2.2.2.5.1);
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
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset

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
                f"(the unique key of the {upper.value} level), got {value or 'none'!r}",
                hierarchy=True,
            )
    if retrieve:
        key = UNIQUE_KEY[level]
        value = text_value(identifier.get(key.keyword))
        if not value or "*" in value or "?" in value:
            raise QueryError(
                f"a {level.value} retrieval must name what to retrieve by {key.keyword} "
                f"(one value or a list), got {value or 'none'!r}",
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
        raise QueryError(f"{attr.keyword}: {value!r} is not an integer", hierarchy=False)
    return value


# --- matching ----------------------------------------------------------------------------------


def glob_pattern(value: str) -> str:
    """A DICOM wildcard value as a SQLite GLOB pattern: ``*`` and ``?`` keep their meaning, every
    other character is literal (GLOB has no escape character; ``[`` is written ``[[]``)."""
    return value.replace("[", "[[]")


def _range(attr: Attribute, value: str) -> tuple[str, str]:
    """(low, high) inclusive, as comparable strings; a single value is low == high."""
    low, dash, high = value.partition("-")
    if not dash:
        high = low
    if not low and not high:
        raise QueryError(f"{attr.keyword}: {value!r} is an empty range", hierarchy=False)
    if attr.kind is Kind.DATE:
        for part in (low, high):
            if part and (len(part) != 8 or not part.isdigit()):
                raise QueryError(
                    f"{attr.keyword}: {value!r} is not a date or date range (YYYYMMDD, "
                    "YYYYMMDD-, -YYYYMMDD, YYYYMMDD-YYYYMMDD; PS3.4 C.2.2.2.5)",
                    hierarchy=False,
                )
        return low or "00000000", high or "99999999"
    lo, hi = pad_time(low, "0"), pad_time(high, "9")
    if not lo or not hi:
        raise QueryError(f"{attr.keyword}: {value!r} is not a time or time range", hierarchy=False)
    return lo, hi


def _column(attr: Attribute) -> Any:
    return getattr(_TABLE[attr.level], attr.column)


def _condition(query: Query, attr: Attribute, value: str) -> Any:
    kind = attr.kind
    if kind is Kind.UID:
        uids = value.split("\\")
        column = _column(attr)
        return column == uids[0] if len(uids) == 1 else column.in_(uids)
    if kind is Kind.PERSON_NAME:
        return _name_condition(query, attr, value)
    if kind is Kind.DATE:
        low, high = _range(attr, value)
        return _column(attr).between(low, high)
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
        return Study.id.in_(
            Series.select(Series.study)
            .join(Instance)
            .where(Instance.sop_class_uid.in_(value.split("\\")))
        )
    if kind is Kind.COUNT:
        return _count(attr) == int(value)
    return _column(attr) == value if not _has_wildcard(value) else _glob(_column(attr), value)


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def _glob(column: Any, value: str) -> Any:
    return pw.Expression(column, "GLOB", glob_pattern(value))


def _name_condition(query: Query, attr: Attribute, value: str) -> Any:
    """Person names per component group, through the person_name keys (see models.PersonName)."""
    owner = Patient.id if attr.level is Level.PATIENT else Study.id
    groups = name_groups(value)
    conditions = []
    for index, group in enumerate(groups):
        if not group or (len(groups) > 1 and group == "*"):
            continue
        folded = fold(group)
        sub = PersonName.select(PersonName.owner).where(PersonName.keyword == attr.keyword)
        if len(groups) > 1:  # a query with "=" matches group by group
            sub = sub.where(PersonName.group == index)
        sub = sub.where(
            _glob(PersonName.folded, folded)
            if _has_wildcard(folded)
            else PersonName.folded == folded
        )
        if query.case_sensitive_names:
            sub = sub.where(
                _glob(PersonName.value, group)
                if _has_wildcard(group)
                else PersonName.value == group
            )
        conditions.append(owner.in_(sub))
    return _all(conditions)


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
    for row in select.dicts().iterator():
        yield _answer(query, row, returned)


@dataclass(frozen=True)
class StoredInstance:
    """One instance to send in a retrieval: its file and what a C-STORE needs to name it."""

    path: str  # relative to storage_dir
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str


def instances(query: Query) -> list[StoredInstance]:
    """Every stored instance under the entities ``query`` matches (its level and below)."""
    select: Any = (
        Instance.select(
            Instance.path, Instance.sop_class_uid, Instance.sop_instance_uid,
            Instance.transfer_syntax,
        )
        .join_from(Instance, Series)
        .join_from(Series, Study)
        .join_from(Study, Patient)
    )  # fmt: skip
    condition = _all(_condition(query, attr, value) for attr, value in query.matches)
    if condition is not None:
        select = select.where(condition)
    order = (Study.id, Series.series_number, Instance.instance_number, Instance.id)
    return [
        StoredInstance(r["path"], r["sop_class_uid"], r["sop_instance_uid"], r["transfer_syntax"])
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
    condition = _all(_condition(query, attr, value) for attr, value in query.matches)
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


def _answer(query: Query, row: dict[str, Any], returned: dict[str, Attribute]) -> Dataset:
    """One response identifier: every key of the request, ours filled in, others empty."""
    rsp = Dataset()
    needs_utf8 = False
    for elem in query.identifier:
        if elem.tag.group in (0x0000, 0x0002) or elem.keyword == "SpecificCharacterSet":
            continue
        keyword = elem.keyword or keyword_for_tag(elem.tag)
        value: Any = ""
        attr_alias = f"k_{keyword}"
        if elem.keyword == "QueryRetrieveLevel":
            value = query.level.value
        elif attr_alias in returned:
            value = row[attr_alias]
            if value is None:
                value = ""
            elif isinstance(value, int):
                value = str(value)
            elif returned[attr_alias].kind is Kind.MODALITIES or "\\" in str(value):
                value = [v for v in str(value).split("\\") if v] if value else ""
        elif elem.VR == "SQ":
            value = []
        vr = elem.VR if elem.VR not in ("UN", None) else _vr(elem.tag)
        rsp.add_new(elem.tag, vr, value)
        needs_utf8 = needs_utf8 or _non_ascii(value)
    asked = query.identifier.get("SpecificCharacterSet")
    asked_utf8 = asked is not None and "ISO_IR 192" in text_value(asked)
    if needs_utf8 or asked_utf8:
        # PS3.5 6.1.2.3: UTF-8 carries every character we hold, whatever the query used.
        rsp.SpecificCharacterSet = "ISO_IR 192"
    return rsp


def _non_ascii(value: Any) -> bool:
    values = value if isinstance(value, list) else [value]
    return any(isinstance(v, str) and not v.isascii() for v in values)


def _vr(tag: Any) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return "UN"
