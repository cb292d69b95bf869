"""Typed errors. The CLI turns any SparseflashError into one line on stderr and exit code 2."""


class SparseflashError(Exception):
    """Bad input or a state the user can fix; the message says what and how."""


class CheckpointError(SparseflashError):
    """A checkpoint folder or file is missing, incomplete or inconsistent."""


class UnsupportedModelError(SparseflashError):
    """The checkpoint's architecture, activation or tensor type is not supported."""


class ArtefactError(SparseflashError):
    """A profile, predictor or layout artefact is missing, stale or malformed."""
