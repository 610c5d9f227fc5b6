"""The federation's message protocol: record names and keys, in one place.

Plain Python (no flwr import): the ClientApp, the ServerApp strategies and the tests import
these names instead of repeating string literals. A message's ``RecordDict`` holds:

server -> site (train and evaluate)
    ``ARRAYS``  ArrayRecord: the global adapters (plaintext wire format, or CKKS ciphertexts)
    ``CONFIG``  ConfigRecord: ``SERVER_ROUND`` (added by Flower), ``BACKBONE_FINGERPRINT``,
                and in HE mode ``HE_LAYOUT`` and, once the global is an encrypted sum,
                ``HE_TOTAL`` (the summed example count the sites divide by) and
                ``HE_SOURCES`` (JSON: which uploads the sum holds, with their tags)
    ``HE_PROBES`` ArrayRecord (HE, with ``HE_SOURCES``): the first ciphertext of each summed
                upload, so sites can check each upload's count slot

site -> server (train reply)
    ``ARRAYS``  ArrayRecord: the site's update (absent when the site refused the round)
    ``METRICS`` MetricRecord: ``NUM_EXAMPLES`` (the averaging weight) and the metrics the
                site's policy lets leave (``core.federation.policy``; never ``TRAIN_LOSS``
                under DP, only ``NUM_EXAMPLES`` by default under HE)
    ``SITE``    ConfigRecord: ``SITE_NAME``, ``SITE_STATUS``, ``SITE_REASON``,
                ``PRIVACY_LEDGER`` (JSON, at most ``MAX_LEDGER_BYTES``) and in HE mode
                ``HE_LAYOUT`` and ``HE_TAG`` (the upload's HMAC, see ``core.he.provenance``).
                ``PRIVACY_LEDGER`` is the site's privacy statement ("" without DP): its ledger
                (``PrivacyLedger.to_dict``) plus ``"policy"`` (``SitePolicy.to_dict``) and
                ``"released"`` (``policy.release_manifest``: what this reply carries, each
                marked covered or not by the epsilon guarantee)

site -> server (evaluate reply)
    ``METRICS`` and ``SITE`` (``SITE_NAME`` only) as above, no arrays; no metrics when the
    site's policy refuses. Under head-sharing "local" (only), ``LOCAL_HEAD`` (1: evaluated
    with the site's own head, 0: with the untrained initial head, the site has not trained
    yet) comes with the other evaluation metrics.

site -> server (HE verdict, instead of a train or evaluate reply)
    ``SITE`` only: ``SITE_NAME`` and ``HE_VERDICT`` (JSON: the uploads of the encrypted sum
    that failed verification, or why the sum does not decrypt).

A ClientApp that fails replies with a Flower error whose reason is a category and an error id
only; the full text stays in the site's log.

The server validates every reply against exactly this: the record names and types in
``REPLY_RECORDS``, the keys of ``SITE`` in ``SITE_KEYS``, numbers only in ``METRICS``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

# Record names inside a message's RecordDict.
ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
SITE = "site"

# Keys of the server's ConfigRecord.
SERVER_ROUND = "server-round"
BACKBONE_FINGERPRINT = "backbone-fingerprint"
HE_LAYOUT = "he-layout"
HE_TOTAL = "he-total"
HE_SOURCES = "he-sources"

# Extra record of a server message in HE mode.
HE_PROBES = "he-probes"

# Keys of a reply's MetricRecord.
NUM_EXAMPLES = "num-examples"  # the averaging weight (Flower FedAvg's ``weighted_by_key``)
TRAIN_LOSS = "train-loss"
EPSILON = "epsilon"
LOCAL_HEAD = "local-head"  # evaluate: 1 the site's own head, 0 the initial global head

# Keys of a reply's SITE ConfigRecord.
SITE_NAME = "name"
SITE_STATUS = "status"
SITE_REASON = "reason"
PRIVACY_LEDGER = "privacy-ledger"
HE_TAG = "he-tag"
HE_VERDICT = "he-verdict"

# Bounds on what a reply may carry.
MAX_LEDGER_BYTES = 256 * 1024  # a ledger of thousands of rounds is ~100 KiB
MAX_SITE_NAME_CHARS = 128

# What each kind of reply holds: record name -> record type ("array", "metric", "config").
TRAIN_REPLY = {ARRAYS: "array", METRICS: "metric", SITE: "config"}
REFUSAL_REPLY = {METRICS: "metric", SITE: "config"}
EVALUATE_REPLY = {METRICS: "metric", SITE: "config"}
VERDICT_REPLY = {SITE: "config"}
REPLY_RECORDS = {
    "train": TRAIN_REPLY,
    "refusal": REFUSAL_REPLY,
    "evaluate": EVALUATE_REPLY,
    "verdict": VERDICT_REPLY,
}
# Keys a reply's SITE record may hold, per reply kind (all strings); the first is required.
SITE_KEYS = {
    "train": (SITE_NAME, SITE_STATUS, SITE_REASON, PRIVACY_LEDGER, HE_LAYOUT, HE_TAG),
    "refusal": (SITE_NAME, SITE_STATUS, SITE_REASON, PRIVACY_LEDGER),
    "evaluate": (SITE_NAME,),
    "verdict": (SITE_NAME, HE_VERDICT),
}

# Values of SITE_STATUS.
TRAINED = "trained"
REFUSED = "refused"


def int_of(record: Mapping[str, object], key: str, default: int | None = None) -> int:
    """``record[key]`` (``default`` when absent and given) converted as ``int()`` would: the
    typed way to read a number out of a Flower ConfigRecord or MetricRecord, whose values
    are a union that also holds lists and arrays.

    Raises:
        KeyError: the key is absent and there is no default.
        TypeError: the value is a list or an array, not a scalar.
        ValueError: a string that is not an integer.
    """
    if key not in record and default is not None:
        return default
    return int(_scalar(record[key], key))


def float_of(record: Mapping[str, object], key: str) -> float:
    """``record[key]`` converted as ``float()`` would (see :func:`int_of`).

    Raises:
        KeyError: the key is absent.
        TypeError: the value is a list or an array, not a scalar.
        ValueError: a string that is not a number.
    """
    return float(_scalar(record[key], key))


def _scalar(value: object, key: str) -> int | float | str | bytes:
    if isinstance(value, int | float | str | bytes):
        return value
    raise TypeError(f"record key {key!r} holds a {type(value).__name__}, not a number")


# Ciphertexts travel as uint8 arrays named by their zero-padded index (sorted = ordered).
_CIPHERTEXT_PREFIX = "ct-"


def ciphertexts_to_arrays(ciphertexts: Sequence[bytes]) -> dict[str, np.ndarray]:
    """CKKS ciphertexts -> named uint8 arrays for an ArrayRecord, in order."""
    return {
        f"{_CIPHERTEXT_PREFIX}{i:05d}": np.frombuffer(c, dtype=np.uint8).copy()
        for i, c in enumerate(ciphertexts)
    }


def arrays_to_ciphertexts(arrays: Mapping[str, np.ndarray]) -> list[bytes]:
    """Inverse of :func:`ciphertexts_to_arrays`. Raises ValueError on a name or dtype that
    :func:`ciphertexts_to_arrays` never produces."""
    names = sorted(arrays)
    expected = [f"{_CIPHERTEXT_PREFIX}{i:05d}" for i in range(len(names))]
    if names != expected:
        raise ValueError(f"ciphertext arrays must be named {expected[:2]}..., got {names[:3]}...")
    out = []
    for name in names:
        array = np.asarray(arrays[name])
        if array.dtype != np.uint8 or array.ndim != 1:
            raise ValueError(f"ciphertext array {name!r} must be 1-D uint8, got {array.dtype}")
        out.append(array.tobytes())
    return out
