"""The error tree of the alerts package, mapped to exit codes by the CLI."""

from __future__ import annotations


class AlertsError(Exception):
    """Base class of every error raised by the alerts package."""


class RuleFileError(AlertsError, ValueError):
    """A rule file is missing, is not valid YAML, or lacks a field an alert must have."""


class TemplateError(AlertsError, ValueError):
    """An annotation template uses something the local renderer does not support."""


class SourceError(AlertsError):
    """A certificate source (store, file, probed endpoint) could not be read."""


class NotifyError(AlertsError):
    """Alertmanager or the webhook refused or did not answer a notification."""
