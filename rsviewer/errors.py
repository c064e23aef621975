"""User-facing errors.

Every problem a user can cause (bad file, wrong model, empty query, ...) is raised as
an ``RsviewerError`` with a one-line message. The CLI prints ``error: <message>`` and
exits 2; the GUI shows the message in its status line. Anything else is a bug and
keeps its traceback.
"""
from __future__ import annotations


class RsviewerError(Exception):
    """A problem with the user's input, reported as one clear line."""


class ImageError(RsviewerError):
    """An image file that cannot be read (missing, corrupt, not an image, too large)."""


class DatasetError(RsviewerError):
    """A dataset file that cannot be parsed, or one that lists missing images."""


class ModelError(RsviewerError):
    """A model folder that cannot be loaded (missing, wrong architecture, bad weights)."""


class IndexError_(RsviewerError):
    """An index that cannot be used (missing, corrupt, built by another model)."""


class QueryError(RsviewerError):
    """A query that cannot be run (empty text, unreadable image)."""


class NotAvailable(RsviewerError):
    """A method that this architecture does not provide."""


class Cancelled(RsviewerError):
    """A long job stopped by the user; no partial output is left behind."""


class OutputError(RsviewerError):
    """An output path that would lose data or cannot be written (a user's folder, an input, ...)."""
