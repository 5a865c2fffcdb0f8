"""Named DIMSE statuses and their categories (PS3.7 Annex C; PS3.4 B.2.3 for C-STORE).

Handlers return these names, never hex literals. ``describe`` gives the meaning a person reads in
an SCU tool's report; ``category`` drives the CLI exit codes.
"""

from __future__ import annotations

from enum import IntEnum

from dicomnode.qr import Operation


class Status(IntEnum):
    """The statuses this node sends or interprets."""

    SUCCESS = 0x0000
    # PS3.7 Annex C: general statuses shared by the DIMSE services
    NO_SUCH_ATTRIBUTE = 0x0105
    INVALID_ATTRIBUTE_VALUE = 0x0106
    PROCESSING_FAILURE = 0x0110
    NO_SUCH_SOP_INSTANCE = 0x0112
    MISSING_ATTRIBUTE = 0x0120
    MISSING_ATTRIBUTE_VALUE = 0x0121
    # Same SOP Instance UID, different content, duplicates policy "reject" (PS3.7 C.5: the
    # general "Duplicate SOP Instance" failure).
    DUPLICATE_SOP_INSTANCE = 0x0111
    INVALID_OBJECT_INSTANCE = 0x0117  # e.g. a SOP Instance UID that is not a valid UID
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    NOT_AUTHORIZED = 0x0124
    DUPLICATE_INVOCATION = 0x0210
    UNRECOGNIZED_OPERATION = 0x0211
    MISTYPED_ARGUMENT = 0x0212
    RESOURCE_LIMITATION = 0x0213
    # PS3.4 B.2.3: Storage Service Class
    OUT_OF_RESOURCES = 0xA700  # free space under the floor, or the file could not be written
    # A7xx sub-code: the file was written but the index write failed (database locked or failing);
    # the file is removed again. "Refused: out of resources" tells the sender to retry later.
    OUT_OF_RESOURCES_INDEX = 0xA701
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    COERCION_OF_DATA_ELEMENTS = 0xB000
    ELEMENTS_DISCARDED = 0xB006
    DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007
    # PS3.4 C.4.1.1.4 (C-FIND) and C.4.2.1.5 (C-MOVE) use the same codes under other names.
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    UNABLE_TO_PERFORM_SUBOPERATIONS = 0xA702  # C.4.2.1.5: every sub-operation failed
    MOVE_DESTINATION_UNKNOWN = 0xA801
    SUBOPERATIONS_COMPLETE_WITH_FAILURES = 0xB000  # one or more failures or warnings
    UNABLE_TO_PROCESS = 0xC000
    CANCEL = 0xFE00
    PENDING = 0xFF00
    PENDING_WARNING = 0xFF01


class Category(IntEnum):
    """PS3.7 C.1 status categories, in increasing order of badness (cancel sits apart)."""

    SUCCESS = 0
    WARNING = 1
    FAILURE = 2
    CANCEL = 3
    PENDING = 4


class ExitCode(IntEnum):
    """Exit codes of the ``dicomnode`` SCU commands, from the worst status category seen."""

    SUCCESS = 0
    WARNING = 1
    FAILURE = 2
    CANCEL = 3
    USAGE = 4
    UNREACHABLE = 5


_DESCRIPTIONS: dict[int, str] = {
    Status.SUCCESS: "Success",
    Status.NO_SUCH_ATTRIBUTE: "Failure: no such attribute",
    Status.INVALID_ATTRIBUTE_VALUE: "Failure: invalid attribute value",
    Status.PROCESSING_FAILURE: "Failure: processing failure",
    Status.NO_SUCH_SOP_INSTANCE: "Failure: no such SOP instance",
    Status.MISSING_ATTRIBUTE: "Failure: missing attribute",
    Status.MISSING_ATTRIBUTE_VALUE: "Failure: missing attribute value",
    Status.INVALID_OBJECT_INSTANCE: "Failure: invalid SOP instance",
    Status.SOP_CLASS_NOT_SUPPORTED: "Refused: SOP class not supported",
    Status.NOT_AUTHORIZED: "Refused: not authorized",
    Status.DUPLICATE_INVOCATION: "Failure: duplicate invocation",
    Status.UNRECOGNIZED_OPERATION: "Failure: unrecognized operation",
    Status.MISTYPED_ARGUMENT: "Failure: mistyped argument",
    Status.RESOURCE_LIMITATION: "Failure: resource limitation",
    Status.DUPLICATE_SOP_INSTANCE: "Failure: duplicate SOP instance",
    Status.OUT_OF_RESOURCES_INDEX: "Refused: out of resources (index unavailable)",
    Status.CANCEL: "Cancelled",
}

# Ranges from PS3.4 B.2.3 / C.4 and PS3.7 C, checked in order.
_RANGES: tuple[tuple[int, int, Category, str], ...] = (
    (0xA700, 0xA7FF, Category.FAILURE, "Refused: out of resources"),
    (0xA701, 0xA701, Category.FAILURE, "Refused: out of resources (unable to calculate matches)"),
    (
        0xA702,
        0xA702,
        Category.FAILURE,
        "Refused: out of resources (unable to perform sub-operations)",
    ),
    (0xA800, 0xA8FF, Category.FAILURE, "Refused: move destination unknown"),
    (0xA900, 0xA9FF, Category.FAILURE, "Error: data set does not match SOP class"),
    (0xB000, 0xB000, Category.WARNING, "Warning: coercion of data elements"),
    (0xB006, 0xB006, Category.WARNING, "Warning: elements discarded"),
    (0xB007, 0xB007, Category.WARNING, "Warning: data set does not match SOP class"),
    (0xB000, 0xBFFF, Category.WARNING, "Warning"),
    (0xC000, 0xCFFF, Category.FAILURE, "Error: cannot understand"),
    (0xFE00, 0xFE00, Category.CANCEL, "Cancelled"),
    (0xFF00, 0xFF01, Category.PENDING, "Pending"),
    (0x0001, 0x0001, Category.WARNING, "Warning"),
    (0x0107, 0x0107, Category.WARNING, "Warning: attribute list error"),
    (0x0116, 0x0116, Category.WARNING, "Warning: attribute value out of range"),
    (0x0100, 0x01FF, Category.FAILURE, "Failure"),
    (0x0200, 0x02FF, Category.FAILURE, "Failure"),
)


def category(status: int) -> Category:
    """The PS3.7 C.1 category of ``status``; unknown codes count as failures."""
    if status == Status.SUCCESS:
        return Category.SUCCESS
    for low, high, cat, _ in _RANGES:
        if low <= status <= high:
            return cat
    return Category.FAILURE


# Meanings particular to the Query/Retrieve operations, where they differ from (or are more precise
# than) the general ones above: PS3.4 C.4.1.1.4 (C-FIND), C.4.2.1.5 (C-MOVE), C.4.3.1.4 (C-GET).
_RETRIEVE_MEANINGS = {
    0x0000: "Success: sub-operations complete, no failures",
    0xA701: "Refused: out of resources, unable to calculate number of matches",
    0xA702: "Refused: out of resources, unable to perform sub-operations",
    0xA900: "Failed: identifier does not match SOP class",
    0xB000: "Warning: sub-operations complete, one or more failures or warnings",
    0xFE00: "Cancelled: sub-operations terminated due to cancel indication",
}
_OPERATION_MEANINGS: dict[Operation, dict[int, str]] = {
    Operation.FIND: {
        0x0000: "Success: matching is complete",
        0xA700: "Refused: out of resources",
        0xA900: "Failed: identifier does not match SOP class",
        0xFE00: "Cancelled: matching terminated due to cancel request",
    },
    Operation.MOVE: {**_RETRIEVE_MEANINGS, 0xA801: "Refused: move destination unknown"},
    Operation.GET: _RETRIEVE_MEANINGS,
}


def describe(status: int, operation: Operation | None = None) -> str:
    """A short meaning for ``status``, with the code: ``0xA700 Refused: out of resources``;
    for a Query/Retrieve ``operation``, in that operation's terms."""
    if operation is not None:
        text = _OPERATION_MEANINGS[operation].get(status)
        if text is None and 0xC000 <= status <= 0xCFFF:
            text = "Failed: unable to process"  # the Cxxx failure of all three operations
        if text is not None:
            return f"0x{status:04X} {text}"
    text = _DESCRIPTIONS.get(status)
    if text is None:
        text = next((t for lo, hi, _, t in _RANGES if lo <= status <= hi), "Unknown status")
    return f"0x{status:04X} {text}"


def exit_code(categories: list[Category]) -> ExitCode:
    """The exit code for a command that saw these status categories (the worst one wins)."""
    if Category.CANCEL in categories:
        return ExitCode.CANCEL
    if Category.FAILURE in categories:
        return ExitCode.FAILURE
    if Category.WARNING in categories:
        return ExitCode.WARNING
    return ExitCode.SUCCESS
