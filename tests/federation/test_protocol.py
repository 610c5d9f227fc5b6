"""The typed readers of record values the apps use instead of bare ``int()`` / ``float()``."""

from __future__ import annotations

import numpy as np
import pytest

from core.federation import protocol as P


def test_numbers_convert_as_int_and_float_would() -> None:
    record = {"n": 7, "x": 0.25, "s": "12", "b": True}
    assert P.int_of(record, "n") == 7 and P.float_of(record, "x") == 0.25
    assert P.int_of(record, "s") == 12 and P.int_of(record, "b") == 1
    assert P.int_of(record, "missing", default=0) == 0


def test_absent_keys_lists_and_arrays_raise_what_int_would() -> None:
    record = {"l": [1, 2], "a": np.zeros(2), "s": "x"}
    with pytest.raises(KeyError):
        P.int_of(record, "missing")
    with pytest.raises(TypeError, match="'l' holds a list"):
        P.int_of(record, "l")
    with pytest.raises(TypeError, match="'a' holds a ndarray"):
        P.float_of(record, "a")
    with pytest.raises(ValueError):
        P.float_of(record, "s")


def test_ciphertexts_round_trip_through_named_uint8_arrays() -> None:
    blobs = [b"\x00\x01", b"", b"abc"]
    assert P.arrays_to_ciphertexts(P.ciphertexts_to_arrays(blobs)) == blobs


def test_the_reply_metric_keys_are_pinned() -> None:
    """Metric keys are wire format: a renamed key is a reply the other side misreads. The
    privacy report keeps its own copy of the local-head key (core.privacy may not import
    core.federation); it must stay the protocol's."""
    from core.privacy import report

    assert (P.NUM_EXAMPLES, P.TRAIN_LOSS, P.EPSILON) == ("num-examples", "train-loss", "epsilon")
    assert P.LOCAL_HEAD == report.LOCAL_HEAD == "local-head"
