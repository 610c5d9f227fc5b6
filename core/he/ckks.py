"""The public API of ``core.he`` in one import, for code outside the package (``client``,
``server``, ``core.federation``, ``deploy``, benchmarks and tests), and ``python -m
core.he.ckks`` (the CLI of :mod:`core.he.cli`). The package docstring says how the pieces fit;
each name lives in the focused module listed there."""

from __future__ import annotations

from core.he.aggregate import EncryptedAggregate, aggregate_encrypted, sum_encrypted
from core.he.cli import main
from core.he.context import CkksContext, context_from_bytes, new_secret_context
from core.he.encrypt import (
    CHECK_SLOT_TOLERANCE,
    EncryptedUpdate,
    decrypt_average,
    decrypt_count_slot,
    encrypt_update,
)
from core.he.errors import (
    AggregationError,
    CapacityError,
    CiphertextError,
    CkksError,
    CkksParamsError,
    ContextFileError,
    InsecureKeyFileWarning,
    IntegrityError,
    KeyFilePermissionError,
    LayoutError,
    SecretKeyRequiredError,
    SiteId,
    TensealUnavailableError,
)
from core.he.keys import (
    CONTEXT_INFO_FILE,
    PUBLIC_CONTEXT_FILE,
    SECRET_CONTEXT_FILE,
    load_public_context,
    load_secret_context,
    provision,
)
from core.he.packing import CkksLayout, flatten_state, make_layout, unflatten_state
from core.he.params import SEAL_MAX_MODULUS_BITS_128, CkksParams

__all__ = [
    "CHECK_SLOT_TOLERANCE",
    "CONTEXT_INFO_FILE",
    "PUBLIC_CONTEXT_FILE",
    "SEAL_MAX_MODULUS_BITS_128",
    "SECRET_CONTEXT_FILE",
    "AggregationError",
    "CapacityError",
    "CiphertextError",
    "CkksContext",
    "CkksError",
    "CkksLayout",
    "CkksParams",
    "CkksParamsError",
    "ContextFileError",
    "EncryptedAggregate",
    "EncryptedUpdate",
    "InsecureKeyFileWarning",
    "IntegrityError",
    "KeyFilePermissionError",
    "LayoutError",
    "SecretKeyRequiredError",
    "SiteId",
    "TensealUnavailableError",
    "aggregate_encrypted",
    "context_from_bytes",
    "decrypt_average",
    "decrypt_count_slot",
    "encrypt_update",
    "flatten_state",
    "load_public_context",
    "load_secret_context",
    "main",
    "make_layout",
    "new_secret_context",
    "provision",
    "sum_encrypted",
    "unflatten_state",
]

if __name__ == "__main__":
    raise SystemExit(main())
