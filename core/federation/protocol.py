"""The federation's message protocol: record names and keys, in one place.

Plain Python (no flwr import): the ClientApp, the ServerApp strategies and the tests import
these names instead of repeating string literals. A message's ``RecordDict`` holds:

server -> site (train and evaluate)
    ``ARRAYS``  ArrayRecord: the global adapters (plaintext wire format, or CKKS ciphertexts)
    ``CONFIG``  ConfigRecord: ``SERVER_ROUND`` (added by Flower), ``BACKBONE_FINGERPRINT``,
                and in HE mode ``HE_LAYOUT`` and, once the global is an encrypted sum,
                ``HE_TOTAL`` (the summed example count the sites divide by)

site -> server (train reply)
    ``ARRAYS``  ArrayRecord: the site's update (absent when the site refused the round)
    ``METRICS`` MetricRecord: ``NUM_EXAMPLES`` (the averaging weight) and the metrics the
                site's policy lets leave (``core.federation.policy``; never ``TRAIN_LOSS``
                under DP, only ``NUM_EXAMPLES`` by default under HE)
    ``SITE``    ConfigRecord: ``SITE_NAME``, ``SITE_STATUS``, ``SITE_REASON``,
                ``PRIVACY_LEDGER`` and in HE mode ``HE_LAYOUT``. ``PRIVACY_LEDGER`` is the
                site's privacy statement as JSON ("" without DP): its ledger
                (``PrivacyLedger.to_dict``) plus ``"policy"`` (``SitePolicy.to_dict``) and
                ``"released"`` (``policy.release_manifest``: what this reply carries, each
                marked covered or not by the epsilon guarantee)

site -> server (evaluate reply)
    ``METRICS`` and ``SITE`` as above (no arrays; no metrics when the site's policy refuses).

A ClientApp that fails replies with a Flower error whose reason is a category and an error id
only; the full text stays in the site's log.
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

# Keys of a reply's MetricRecord.
NUM_EXAMPLES = "num-examples"  # the averaging weight (Flower FedAvg's ``weighted_by_key``)
TRAIN_LOSS = "train-loss"
EPSILON = "epsilon"

# Keys of a reply's SITE ConfigRecord.
SITE_NAME = "name"
SITE_STATUS = "status"
SITE_REASON = "reason"
PRIVACY_LEDGER = "privacy-ledger"

# Values of SITE_STATUS.
TRAINED = "trained"
REFUSED = "refused"

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
