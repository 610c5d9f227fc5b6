"""The privacy layer's errors: one base class, :class:`PrivacyError`, that the others
subclass, so a caller (the ClientApp's error mod) can catch every privacy refusal at once."""

from __future__ import annotations


class PrivacyError(Exception):
    """Base class of the privacy layer's errors."""


class PrivacyConfigError(PrivacyError, ValueError):
    """A DP setting or training parameter that cannot give a meaningful guarantee."""


class LedgerFormatError(PrivacyError, ValueError):
    """A serialised ledger that is missing a field or holds a value of the wrong kind."""


class AccountantMismatchError(PrivacyError):
    """An Opacus accountant that does not continue the ledger (reset, or another mechanism)."""
