"""Typed errors. Library code raises these; only ``cli.py`` turns them into messages and exit codes.

Each error says what went wrong, why, and how to fix it, in one paragraph.
"""

from __future__ import annotations


class QuantshipError(Exception):
    """Base class: a failure the user can act on. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class RecipeError(QuantshipError):
    """The recipe (or a command-line argument) is invalid; nothing was run."""

    exit_code = 2


class ModelFolderError(QuantshipError):
    """A model folder or hub snapshot is missing, incomplete or unsafe to load."""


class CalibrationError(QuantshipError):
    """Calibration or evaluation text could not be read or is too short."""


class QuantizationError(QuantshipError):
    """A model cannot be quantized as asked (unsupported architecture, width, format)."""


class TargetUnavailable(QuantshipError):
    """A compile/serve target cannot run on this machine (its engine or hardware is missing)."""


class StageError(QuantshipError):
    """A stage failed for a reason that is not the user's recipe."""


class GateFailed(QuantshipError):
    """A quality gate from the recipe failed; the artifacts are kept, the run exits non-zero."""

    exit_code = 3
