"""The errors of ``core.he``: one base class, :class:`CkksError`, that every failure of
encryption, aggregation or key handling subclasses (so a caller can catch them all at once),
and the warning for a secret key file with open permissions."""

from __future__ import annotations

# A site as the server names it in errors: a Flower node id or a site name.
SiteId = str | int


class CkksError(Exception):
    """Base class, so callers can catch every failure of ``core.he`` at once."""


class TensealUnavailableError(CkksError, ImportError):
    """TenSEAL is missing: HE mode cannot run without it."""


class CkksParamsError(CkksError, ValueError):
    """Parameters SEAL rejects or that cannot hold the values."""


class ContextFileError(CkksError, ValueError):
    """A context file is of the wrong kind, format or is corrupt."""


class KeyFilePermissionError(CkksError, PermissionError):
    """The secret context file is readable or writable by other users."""


class InsecureKeyFileWarning(UserWarning):
    """The secret context file has open permissions but the caller allowed it."""


class SecretKeyRequiredError(CkksError, ValueError):
    """Encryption or decryption was asked of a context without the secret key."""


class LayoutError(CkksError, ValueError):
    """The state dict, layout and ciphertexts do not describe the same update."""


class CapacityError(CkksError, ValueError):
    """Values or site counts that would wrap around the modulus and corrupt the sum."""


class CiphertextError(CkksError, ValueError):
    """One ciphertext is malformed, tampered with or from another context.

    ``site`` and ``index`` say which, so the server can drop that site and carry on.
    """

    def __init__(self, reason: str, *, site: SiteId | None = None, index: int | None = None):
        self.reason = reason
        self.site = site
        self.index = index
        where = []
        if site is not None:
            where.append(f"site {site!r}")
        if index is not None:
            where.append(f"ciphertext {index}")
        prefix = ", ".join(where) if where else "ciphertext"
        super().__init__(f"{prefix}: {reason}")


class IntegrityError(CkksError, ValueError):
    """The decrypted count slots disagree with ``total_examples``: the sum is not trustworthy."""


class AggregationError(CkksError, ValueError):
    """No update was valid, so there is nothing to aggregate this round."""
