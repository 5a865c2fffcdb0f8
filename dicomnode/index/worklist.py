"""Modality Worklist identifiers (PS3.4 K.6) matched against the worklist items of the index.

Each worklist item is one Scheduled Procedure Step, held as a row of ``worklist_item`` (the
columns of ``attributes.WORKLIST_ATTRIBUTES``) and as the whole item data set. A query runs in
two steps:

1. SQL narrows the rows on the keys that have a column and an exact meaning there (patient ID,
   accession number, modality, station AE title, start date range, ...), using their indexes;
2. every key of the identifier, those included, is matched on the stored data set as PS3.4
   C.2.2.2 says, so that the answer never depends on which keys happen to have a column. Step 1
   only ever keeps a superset of what step 2 accepts.

Matching per C.2.2.2: universal (empty, or ``*``), single value, UID lists, wildcards ``*`` and
``?`` (every other character literal) for text, ranges for DA, TM and DT, and sequence matching
(C.2.2.2.6): a sequence key with one item matches when some stored item matches every key of it,
and its answer holds the matching items with the keys asked for; a zero-length sequence key
returns the stored sequence whole. Person names match per component group, case-insensitively
unless ``case_sensitive_names`` (as for C-FIND, ``query.case_sensitive_names``). Each answer
holds exactly the keys of the request, those the item lacks empty (K.6.1.2.2 return keys).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import peewee as pw
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

from dicomnode.index.attributes import (
    STEP_SEQUENCE,
    WORKLIST_BY_KEYWORD,
    fold,
    name_groups,
    pad_time,
    text_value,
)
from dicomnode.index.models import WorklistItem
from dicomnode.index.query import (
    QueryError,
    date_time_range,
    glob_pattern,
    raw_element,
    shown,
)

COMPLETED = "COMPLETED"
_CHARSET = Tag(0x00080005)
_STEP_TAG = Tag(STEP_SEQUENCE)
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
# Value representations matched as single values only, never with wildcards (C.2.2.2.4).
NO_WILDCARDS = frozenset(
    {"DA", "TM", "DT", "SL", "SS", "US", "UL", "SV", "UV", "FD", "FL", "DS", "IS", "AS", "UI"}
)
_BINARY = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "AT"})


@dataclass
class Key:
    """One key of a worklist identifier: what to match (``value``, "" universal) and return.

    For a sequence, ``item`` holds the keys of its one query item, or is None for a zero-length
    sequence (return the stored sequence whole).
    """

    tag: BaseTag
    vr: str
    value: str = ""
    item: list[Key] | None = None

    @property
    def keyword(self) -> str:
        return keyword_for_tag(self.tag) or str(self.tag)

    @property
    def matches_everything(self) -> bool:
        if self.vr == "SQ":
            return self.item is None or all(k.matches_everything for k in self.item)
        return self.value in ("", "*")


@dataclass
class WorklistQuery:
    """A validated worklist identifier: its keys, in request order, and how to match names."""

    keys: list[Key]
    case_sensitive_names: bool = False
    asked_utf8: bool = False
    # Keys of the step item matched like the request's but never answered: the node's own
    # constraints (a caller's worklist_scope: its AE title as ScheduledStationAETitle).
    step_constraints: list[Key] = field(default_factory=list)
    # Extra SQL conditions the caller adds (hidden completed steps: a single-valued column).
    conditions: list[Any] = field(default_factory=list)

    def constrain_step(self, keyword: str, value: str) -> None:
        """Match the step item's ``keyword`` on ``value`` too, without answering it."""
        tag = Tag(keyword)
        self.step_constraints.append(Key(tag, _dictionary_vr(tag), value))

    def step_key(self, keyword: str) -> Key | None:
        """The key ``keyword`` inside the Scheduled Procedure Step Sequence item, if given."""
        step = self.top(STEP_SEQUENCE)
        if step is None or not step.item:
            return None
        return next((k for k in step.item if k.keyword == keyword), None)

    def top(self, keyword: str) -> Key | None:
        return next((k for k in self.keys if k.keyword == keyword), None)


def parse(identifier: Dataset, case_sensitive_names: bool = False) -> WorklistQuery:
    """Validate a Modality Worklist C-FIND identifier.

    Raises :class:`QueryError`: ``hierarchy=True`` (answered 0xA900, identifier does not match
    the SOP class) for a sequence key with more than one item (C.2.2.2.6), ``hierarchy=False``
    (0xC000, unable to process) for values that cannot be read or matched.
    """
    try:
        keys = _keys(identifier, "")
        asked_utf8 = "ISO_IR 192" in text_value(identifier.get("SpecificCharacterSet"))
    except QueryError:
        raise
    except (ValueError, TypeError, KeyError, LookupError, AttributeError) as exc:
        raise QueryError(
            f"the identifier cannot be decoded: {type(exc).__name__}", hierarchy=False
        ) from exc
    return WorklistQuery(keys, case_sensitive_names=case_sensitive_names, asked_utf8=asked_utf8)


def _keys(ds: Dataset, where: str) -> list[Key]:
    keys: list[Key] = []
    for elem in ds:
        tag = elem.tag
        if tag.group in (0x0000, 0x0002) or tag == _CHARSET or tag.element == 0x0000:
            continue
        vr = str(elem.VR) if elem.VR not in (None, "UN") else _dictionary_vr(tag)
        label = f"{where}{keyword_for_tag(tag) or tag}"
        if vr == "SQ":
            items = list(elem.value or [])
            if len(items) > 1:
                raise QueryError(
                    f"{label}: a sequence key holds at most one item (PS3.4 C.2.2.2.6), "
                    f"got {len(items)}",
                    hierarchy=True,
                )
            item = _keys(items[0], f"{label}.") if items else None
            keys.append(Key(tag, vr, item=item))
            continue
        value = "" if vr in _BINARY else text_value(elem.value)
        keys.append(Key(tag, vr, _check(label, vr, value)))
    return keys


def _check(label: str, vr: str, value: str) -> str:
    if value in ("", "*"):
        return value
    if vr == "UI":
        for uid in value.split("\\"):
            if len(uid) > 64 or not _UID.fullmatch(uid):
                raise QueryError(
                    f"{label}: {uid!r} is not a UID; UID keys match single values or lists "
                    "of UIDs, never wildcards (PS3.4 C.2.2.2.2)",
                    hierarchy=False,
                )
    elif vr in ("DA", "TM", "DT"):
        _range(label, vr, value)
    return value


def _range(label: str, vr: str, value: str) -> tuple[str, str]:
    """(low, high) inclusive, comparable as strings (C.2.2.2.5); raises for a malformed one."""
    if vr in ("DA", "TM"):
        return date_time_range(label, vr, value)
    low, dash, high = value.partition("-")
    if not dash:
        high = low
    if not low and not high:
        raise QueryError(f"{label}: {shown(label, value)} is an empty range", hierarchy=False)
    # DT: compare the digits, the missing tail as the lowest or highest value (offsets ignored).
    dt_low, dt_high = _datetime(low, "0"), _datetime(high, "9")
    if dt_low is None or dt_high is None:
        raise QueryError(
            f"{label}: {shown(label, value)} is not a date-time range", hierarchy=False
        )
    return dt_low, dt_high


def _datetime(value: str, fill: str) -> str | None:
    value = re.split(r"[+&-]", value.strip(), maxsplit=1)[0] if value.strip() else ""
    digits = value.replace(".", "")
    if value and not digits.isdigit():
        return None
    return (digits + fill * 20)[:20]


def _dictionary_vr(tag: BaseTag) -> str:
    try:
        return str(dictionary_VR(tag)).split(" or ")[0]
    except KeyError:
        return "UN"


# --- matching on a stored item -----------------------------------------------------------------


def matches(query: WorklistQuery, item: Dataset) -> bool:
    """Whether the stored worklist ``item`` matches every key of ``query`` (and its step
    constraints)."""
    if not _matches_all(query.keys, item, query.case_sensitive_names):
        return False
    steps = item.get(_STEP_TAG)
    return not query.step_constraints or any(
        _matches_all(query.step_constraints, step, query.case_sensitive_names)
        for step in (steps.value if steps is not None and steps.VR == "SQ" else [])
    )


def _matches_all(keys: Iterable[Key], ds: Dataset, case_sensitive: bool) -> bool:
    return all(_matches(key, ds, case_sensitive) for key in keys)


def _matches(key: Key, ds: Dataset, case_sensitive: bool) -> bool:
    if key.matches_everything:
        return True
    elem = ds.get(key.tag)
    if key.vr == "SQ":
        assert key.item is not None  # matches_everything covers the zero-length key
        stored = list(elem.value or []) if elem is not None and elem.VR == "SQ" else []
        return any(_matches_all(key.item, sub, case_sensitive) for sub in stored)
    if elem is None or elem.VR == "SQ":
        return False
    # A multi-valued attribute matches when one of its values does.
    values = [v for v in text_value(elem.value).split("\\") if v]
    if key.vr == "PN":
        return any(_name_matches(key.value, name, case_sensitive) for name in values)
    if key.vr == "UI":
        wanted = set(key.value.split("\\"))
        return any(v in wanted for v in values)
    if key.vr in ("DA", "TM", "DT"):
        low, high = _range(key.keyword, key.vr, key.value)
        return any(low <= _comparable(key.vr, v) <= high for v in values)
    if key.vr in NO_WILDCARDS:
        return any(v == key.value.strip() for v in values)
    return any(_text_matches(key.value, v) for v in values)


def _comparable(vr: str, value: str) -> str:
    if vr == "DA":
        return value.strip()
    if vr == "TM":
        return pad_time(value, "0")
    return _datetime(value, "0") or ""


def _text_matches(pattern: str, value: str) -> bool:
    pattern = pattern.strip()
    if "*" in pattern or "?" in pattern:
        return _wildcard(pattern).fullmatch(value) is not None
    return pattern == value


@cache
def _wildcard(pattern: str) -> re.Pattern[str]:
    """``*`` any run of characters, ``?`` one character, everything else literal."""
    parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile("".join(parts), re.DOTALL)


def _name_matches(pattern: str, name: str, case_sensitive: bool) -> bool:
    """PS3.4 C.2.2.2.1: per component group; a pattern without ``=`` may match any group."""
    fix: Callable[[str], str] = (lambda s: s) if case_sensitive else fold
    groups = name_groups(name)
    wanted = name_groups(pattern.strip())
    if len(wanted) == 1:
        return any(_text_matches(fix(wanted[0]), fix(g)) for g in groups if g)
    for i, group in enumerate(wanted):
        if not group or group == "*":
            continue
        stored = groups[i] if i < len(groups) else ""
        if not stored or not _text_matches(fix(group), fix(stored)):
            return False
    return True


# --- answers ------------------------------------------------------------------------------------


def answer(query: WorklistQuery, item: Dataset) -> Dataset:
    """The C-FIND response identifier for a matching ``item``: every key of the request, with the
    item's value or empty; sent as UTF-8 when any text is not ASCII (PS3.5 6.1.2.3).

    Values are copied as the index holds them, still encoded (raw elements of the stored item:
    explicit VR little endian, UTF-8 text), not decoded and re-encoded one by one; see
    :func:`encoded_for`. Read like any data set, they decode on access.
    """
    elements, ascii_only = _fill(query.keys, item, query.case_sensitive_names)
    if query.asked_utf8 or not ascii_only:
        elements[_CHARSET] = raw_element(_CHARSET, "CS", "ISO_IR 192")
    return Dataset(elements)


# VRs whose values may hold characters outside the default repertoire (PS3.5 6.1.2.2).
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "PN", "UC", "UT"})


def _fill(keys: Iterable[Key], item: Dataset, case_sensitive: bool) -> tuple[dict[Any, Any], bool]:
    """The answer's elements for ``keys`` from ``item``, and whether all their text is ASCII."""
    elements: dict[Any, Any] = {}
    ascii_only = True
    for key in keys:
        if key.vr == "SQ":
            elem = item.get(key.tag)
            stored = list(elem.value or []) if elem is not None and elem.VR == "SQ" else []
            if key.item is None:
                items = copy.deepcopy(stored)
                ascii_only = ascii_only and all(_ascii(sub) for sub in items)
            else:
                items = []
                for sub in stored:
                    if _matches_all(key.item, sub, case_sensitive):
                        part, part_ascii = _fill(key.item, sub, case_sensitive)
                        items.append(Dataset(part))
                        ascii_only = ascii_only and part_ascii
            elements[key.tag] = DataElement(key.tag, "SQ", Sequence(items))
            continue
        # get_item leaves a stored element raw (pydicom types it as converted).
        raw: DataElement | RawDataElement | None = (
            item.get_item(key.tag) if key.tag in item else None
        )
        if raw is None or raw.VR == "SQ":
            elements[key.tag] = raw_element(key.tag, key.vr, "")
        elif isinstance(raw, RawDataElement):
            elements[key.tag] = raw
            if raw.VR in _TEXT_VRS and raw.value is not None:
                ascii_only = ascii_only and raw.value.isascii()
        else:  # decoded already, by matching
            elements[key.tag] = DataElement(key.tag, raw.VR, copy.deepcopy(raw.value))
            ascii_only = ascii_only and text_value(raw.value).isascii()
    return elements, ascii_only


def _ascii(ds: Dataset) -> bool:
    """Whether the text of ``ds`` is ASCII, reading raw elements as bytes (a raw sequence may
    say no for a length byte: then the answer is sent as UTF-8, which is never wrong)."""
    for elem in ds.elements():
        if isinstance(elem, RawDataElement):
            value = elem.value if elem.VR in _TEXT_VRS or elem.VR == "SQ" else None
            if value is not None and not value.isascii():
                return False
        elif elem.VR == "SQ":
            if not all(_ascii(sub) for sub in elem.value):
                return False
        elif elem.value is not None and not text_value(elem.value).isascii():
            return False
    return True


def encoded_for(rsp: Dataset, implicit_vr: bool, little_endian: bool) -> Dataset:
    """Mark an answer of :func:`answer`, and every sequence item in it, as encoded for the
    negotiated transfer syntax, so that writing it copies the raw values as they are: text and
    little endian binary values are the same bytes in both little endian syntaxes. A big endian
    syntax is left to pydicom, which then decodes and re-encodes every value."""
    if little_endian:
        _mark(rsp, implicit_vr)
    return rsp


def _mark(ds: Dataset, implicit_vr: bool) -> None:
    # pydicom's writer copies raw elements only when the data set's original encoding and
    # character set are the ones it writes with: the latter is what ``_character_set`` says
    # (the data set's own Specific Character Set, else its parent's).
    ds.set_original_encoding(implicit_vr, True, ds._character_set)
    for elem in ds.elements():
        if isinstance(elem, DataElement) and elem.VR == "SQ":
            for sub in elem.value:
                _mark(sub, implicit_vr)


# --- the SQL that narrows the rows ---------------------------------------------------------------

# Columns a key matches exactly as the stored text (case-sensitive, as step 2 matches them);
# person names are matched case-insensitively by default, so step 1 leaves them to step 2.
_EXACT_VRS = frozenset({"AE", "CS", "SH", "LO", "UI"})


def narrowing(query: WorklistQuery) -> Any:
    """The SQL condition on ``worklist_item`` that keeps every row ``query`` may match (and the
    caller's conditions), or None for no condition."""
    conditions: list[Any] = list(query.conditions)
    step = query.top(STEP_SEQUENCE)
    candidates = [(k, False) for k in query.keys]
    if step is not None and step.item:
        candidates += [(k, True) for k in step.item]
    candidates += [(k, True) for k in query.step_constraints]
    for key, in_step in candidates:
        attr = WORKLIST_BY_KEYWORD.get(key.keyword)
        if attr is None or not attr.column or attr.in_step != in_step or key.matches_everything:
            continue
        column = getattr(WorklistItem, attr.column)
        condition = _column_condition(key, column)
        if condition is not None:
            conditions.append(condition)
    result = None
    for condition in conditions:
        result = condition if result is None else result & condition
    return result


def _column_condition(key: Key, column: Any) -> Any:
    value = key.value.strip()
    if key.vr == "DA":
        low, high = _range(key.keyword, "DA", value)
        return column.between(low, high)
    if key.vr == "UI":
        uids = value.split("\\")
        return column == uids[0] if len(uids) == 1 else column.in_(uids)
    if key.vr not in _EXACT_VRS or "\\" in value:
        return None
    if "*" in value or "?" in value:
        condition = pw.Expression(column, "GLOB", glob_pattern(value))
    else:
        condition = column == value
    # A multi-valued item (two station AE titles, say) is matched value by value in step 2.
    return condition | (pw.fn.instr(column, "\\") > 0)
