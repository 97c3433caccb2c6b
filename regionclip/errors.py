"""Typed errors. Every message names the problem and, where there is one, the remedy.

The library raises these and never prints or exits; ``cli/`` turns each into one stderr line
and an exit code.
"""


class RegionClipError(Exception):
    """Base class: a problem the user can fix, with the fix in the message."""

    exit_code = 1


class BadInput(RegionClipError):
    """An argument is unusable (empty label list, wrong box shape, unknown option value)."""

    exit_code = 2


class BadImage(RegionClipError):
    """An image file is missing, empty, corrupt or not an image."""

    exit_code = 3


class BadConfig(RegionClipError):
    """A config file or override is invalid (unknown key, wrong type, unknown preset)."""

    exit_code = 2


class UnknownModel(RegionClipError):
    """A model or architecture name that is not registered."""

    exit_code = 2


class WeightsUnavailable(RegionClipError):
    """Weights are neither cached nor downloadable, or a checkpoint does not fit the model."""

    exit_code = 4


class BadAnnotations(RegionClipError):
    """A COCO annotation, results or split file is missing or malformed."""

    exit_code = 2


class BadOutput(RegionClipError):
    """An output path is unusable: a folder where a file is wanted (or the reverse), or not writable."""

    exit_code = 2
