"""Packing: how a state dict becomes one flat vector of CKKS slots and comes back.

Tensors are concatenated in sorted key order as float64 (exact for every float dtype) and cut
into ciphertexts of ``values_per_ciphertext`` values each (slot 0 of every ciphertext carries
the integrity count, see :mod:`core.he.encrypt`). The :class:`CkksLayout` says how to undo it;
it travels beside the ciphertexts as one JSON string, so its format is part of the wire.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from core.he.context import CkksContext
from core.he.errors import LayoutError

_LAYOUT_FORMAT = "fedmedvit-ckks-layout/1"

_FLOAT_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


@dataclass(frozen=True)
class CkksLayout:
    """Everything needed to unpack a decrypted vector, as JSON-friendly scalars and lists.

    It travels beside the ciphertexts (e.g. as one string in a Flower ConfigRecord).
    """

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    values_per_ciphertext: int
    context_fingerprint: str
    total_values: int = field(init=False)
    num_ciphertexts: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", tuple(self.keys))
        object.__setattr__(self, "shapes", tuple(tuple(int(d) for d in s) for s in self.shapes))
        object.__setattr__(self, "dtypes", tuple(self.dtypes))
        if not self.keys:
            raise LayoutError("a layout needs at least one tensor")
        if not (len(self.keys) == len(self.shapes) == len(self.dtypes)):
            raise LayoutError(
                f"layout has {len(self.keys)} keys, {len(self.shapes)} shapes and "
                f"{len(self.dtypes)} dtypes; they must match one to one"
            )
        if list(self.keys) != sorted(set(self.keys)):
            raise LayoutError("layout keys must be unique and sorted")
        unknown = sorted(set(self.dtypes) - set(_FLOAT_DTYPES))
        if unknown:
            raise LayoutError(f"unsupported dtypes {unknown}; allowed: {sorted(_FLOAT_DTYPES)}")
        if any(d < 0 for s in self.shapes for d in s):
            raise LayoutError("shape dimensions must be >= 0")
        if self.values_per_ciphertext < 1:
            raise LayoutError("values_per_ciphertext must be >= 1")
        total = sum(math.prod(s) for s in self.shapes)
        if total < 1:
            raise LayoutError("the update holds no values")
        object.__setattr__(self, "total_values", total)
        object.__setattr__(self, "num_ciphertexts", math.ceil(total / self.values_per_ciphertext))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["keys"] = list(self.keys)
        data["shapes"] = [list(s) for s in self.shapes]
        data["dtypes"] = list(self.dtypes)
        data["format"] = _LAYOUT_FORMAT
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CkksLayout:
        if data.get("format") != _LAYOUT_FORMAT:
            raise LayoutError(
                f"unsupported layout format {data.get('format')!r}, expected {_LAYOUT_FORMAT!r}"
            )
        try:
            layout = cls(
                keys=tuple(str(k) for k in data["keys"]),
                shapes=tuple(tuple(int(d) for d in s) for s in data["shapes"]),
                dtypes=tuple(str(d) for d in data["dtypes"]),
                values_per_ciphertext=int(data["values_per_ciphertext"]),
                context_fingerprint=str(data["context_fingerprint"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, LayoutError):
                raise
            raise LayoutError(f"malformed layout record: {exc!r}") from exc
        for name in ("total_values", "num_ciphertexts"):
            if name in data and int(data[name]) != getattr(layout, name):
                raise LayoutError(
                    f"layout says {name}={data[name]} but its shapes give {getattr(layout, name)}"
                )
        return layout

    @classmethod
    def from_json(cls, text: str) -> CkksLayout:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LayoutError(f"layout is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise LayoutError("layout JSON must be an object")
        return cls.from_dict(data)


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _FLOAT_DTYPES:
        raise LayoutError(
            f"only floating-point tensors can be encrypted, got {dtype}; "
            f"allowed: {sorted(_FLOAT_DTYPES)}"
        )
    return name


def make_layout(state: Mapping[str, torch.Tensor], ctx: CkksContext) -> CkksLayout:
    """The layout of ``state`` (sorted keys) packed for ``ctx``.

    Raises:
        LayoutError: the state is empty, has non-string keys or non-float tensors.
    """
    if not state:
        raise LayoutError("the update is empty: nothing to encrypt")
    bad = [k for k in state if not isinstance(k, str)]
    if bad:
        raise LayoutError(f"state dict keys must be strings, got {bad[:3]!r}")
    keys = tuple(sorted(state))
    return CkksLayout(
        keys=keys,
        shapes=tuple(tuple(state[k].shape) for k in keys),
        dtypes=tuple(_dtype_name(state[k].dtype) for k in keys),
        values_per_ciphertext=ctx.params.values_per_ciphertext,
        context_fingerprint=ctx.fingerprint,
    )


def flatten_state(state: Mapping[str, torch.Tensor], layout: CkksLayout) -> np.ndarray:
    """Concatenate the tensors in layout order into one float64 vector (exact for floats).

    Raises:
        LayoutError: the state's keys, shapes or dtypes differ from the layout's.
    """
    missing = sorted(set(layout.keys) - set(state))
    extra = sorted(set(state) - set(layout.keys))
    if missing or extra:
        raise LayoutError(f"state does not match layout: missing {missing}, unexpected {extra}")
    parts = []
    for key, shape, dtype in zip(layout.keys, layout.shapes, layout.dtypes, strict=True):
        tensor = state[key]
        if tuple(tensor.shape) != shape or _dtype_name(tensor.dtype) != dtype:
            raise LayoutError(
                f"{key!r} is {tuple(tensor.shape)} {tensor.dtype}, layout says {shape} {dtype}"
            )
        parts.append(tensor.detach().to("cpu", torch.float64).reshape(-1).numpy())
    return np.concatenate(parts)


def unflatten_state(values: np.ndarray, layout: CkksLayout) -> dict[str, torch.Tensor]:
    """Split a flat vector back into tensors with the layout's keys, shapes and dtypes.

    Raises:
        LayoutError: the vector's length is not the layout's ``total_values``.
    """
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    if flat.size != layout.total_values:
        raise LayoutError(f"got {flat.size} values, layout holds {layout.total_values}")
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for key, shape, dtype in zip(layout.keys, layout.shapes, layout.dtypes, strict=True):
        count = math.prod(shape)
        chunk = torch.from_numpy(flat[offset : offset + count].copy())
        out[key] = chunk.reshape(shape).to(_FLOAT_DTYPES[dtype])
        offset += count
    return out
