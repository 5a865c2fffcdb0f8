"""The Query/Retrieve vocabulary shared by the SCP and SCU sides (PS3.4 Annex C): levels,
information models, operations, and the one table of their SOP Class UIDs."""

from __future__ import annotations

from enum import StrEnum


class Level(StrEnum):
    """Query/Retrieve levels (PS3.4 C.6.1.1.1), as in (0008,0052) Query/Retrieve Level."""

    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


class Model(StrEnum):
    """Query/Retrieve information models (PS3.4 C.6.1 Patient Root, C.6.2 Study Root)."""

    PATIENT_ROOT = "patient"
    STUDY_ROOT = "study"


class Operation(StrEnum):
    """The DIMSE-C operations of the Query/Retrieve Service Class (PS3.4 C.4)."""

    FIND = "C-FIND"
    MOVE = "C-MOVE"
    GET = "C-GET"


# PS3.4 C.6.1.3 / C.6.2.3; the UIDs are listed in PS3.6 Annex A.
SOP_CLASSES: dict[tuple[Model, Operation], str] = {
    (Model.PATIENT_ROOT, Operation.FIND): "1.2.840.10008.5.1.4.1.2.1.1",
    (Model.PATIENT_ROOT, Operation.MOVE): "1.2.840.10008.5.1.4.1.2.1.2",
    (Model.PATIENT_ROOT, Operation.GET): "1.2.840.10008.5.1.4.1.2.1.3",
    (Model.STUDY_ROOT, Operation.FIND): "1.2.840.10008.5.1.4.1.2.2.1",
    (Model.STUDY_ROOT, Operation.MOVE): "1.2.840.10008.5.1.4.1.2.2.2",
    (Model.STUDY_ROOT, Operation.GET): "1.2.840.10008.5.1.4.1.2.2.3",
}
# PS3.4 K.6.1.3: Modality Worklist Information Model - FIND, the other C-FIND model the node
# serves (Basic Worklist Management; one level, no Query/Retrieve Level).
MODALITY_WORKLIST_FIND = "1.2.840.10008.5.1.4.31"

_BY_UID = {uid: key for key, uid in SOP_CLASSES.items()}

# The levels of each model, top first (Study Root has no patient level, PS3.4 C.6.2.1).
LEVELS: dict[Model, tuple[Level, ...]] = {
    Model.PATIENT_ROOT: (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE),
    Model.STUDY_ROOT: (Level.STUDY, Level.SERIES, Level.IMAGE),
}


def model_of(sop_class: str, operation: Operation) -> Model | None:
    """The information model of ``sop_class`` when it is ``operation``'s, else None."""
    found = _BY_UID.get(str(sop_class))
    return found[0] if found and found[1] is operation else None
