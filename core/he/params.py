"""CKKS parameters: ring degree, modulus chain, scale and the site budget, checked on creation.

Why the defaults (one 60-bit prime, N = 4096, scale 2^38, secret-key encryption with a seed):

* **One prime.** Sites weight their update in plaintext, so the scheme never multiplies a
  ciphertext: a ciphertext never leaves the first level, the whole modulus is data modulus and
  one prime suffices (no special prime: no key switching ever happens). 60 bits is SEAL's
  largest prime and N = 4096 the smallest ring that allows it at 128-bit security (SEAL's bound
  is 54 bits for N = 2048, 109 for 4096).
* **Precision.** A sum of K site updates must satisfy ``|sum| * scale < q / 2`` or it wraps
  around. Weights up to ~1 times counts up to 1e4 over 100 sites give ``|sum| <= 1e6 < 2^20``;
  scale 2^38 leaves ``q / 2 / scale = 2^21`` (2x headroom), and the noise of a fresh
  secret-key encryption sits far below the scale.
* **Size.** Every encrypting party holds the key, so symmetric (secret-key) encryption is
  natural, and SEAL then serialises the uniformly random half of a ciphertext as a 64-byte
  seed: an upload is one polynomial of 4096 60-bit coefficients for 2047 values (one slot
  carries the integrity count). SEAL's zstd compression gains nothing on 60-bit coefficients.
* **Bounds are enforced, not hoped for.** A site whose ``count * |w|`` (or count) exceeds
  ``q / 2 / scale / max_sites`` (about 2.1e4 by default) is refused before encryption
  (:class:`~core.he.errors.CapacityError`), and the server refuses to sum more than
  ``max_sites`` updates. Provision a smaller ``scale_bits`` or ``max_sites`` for other
  envelopes.

The measured error, sizes and times behind these choices, against TenSEAL's defaults and the
alternatives, are in ``benchmarks/README.md`` (``benchmarks/he_packing.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from core.he.errors import CkksParamsError

# SEAL's 128-bit security bound on the total coefficient modulus bits, per ring degree.
SEAL_MAX_MODULUS_BITS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}


@dataclass(frozen=True)
class CkksParams:
    """Ring degree, modulus chain and scale; the module docstring says why the defaults.

    ``max_sites`` bounds how many updates may be summed, which bounds how large each site's
    weighted values may be before the sum could wrap around the modulus.
    """

    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = (60,)
    scale_bits: int = 38
    max_sites: int = 100

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff_mod_bit_sizes", tuple(self.coeff_mod_bit_sizes))
        n = self.poly_modulus_degree
        if n not in SEAL_MAX_MODULUS_BITS_128:
            raise CkksParamsError(
                f"poly_modulus_degree must be one of {sorted(SEAL_MAX_MODULUS_BITS_128)}, got {n}"
            )
        bits = self.coeff_mod_bit_sizes
        if not bits or not all(isinstance(b, int) and 20 <= b <= 60 for b in bits):
            raise CkksParamsError(
                f"coeff_mod_bit_sizes must be a non-empty list of ints in [20, 60] (SEAL's prime "
                f"sizes), got {list(bits)}"
            )
        limit = SEAL_MAX_MODULUS_BITS_128[n]
        if sum(bits) > limit:
            raise CkksParamsError(
                f"coeff_mod_bit_sizes {list(bits)} total {sum(bits)} bits, above SEAL's 128-bit "
                f"security bound of {limit} for poly_modulus_degree {n}: use fewer or smaller "
                "primes, or a larger poly_modulus_degree"
            )
        if not isinstance(self.max_sites, int) or self.max_sites < 1:
            raise CkksParamsError(f"max_sites must be a positive int, got {self.max_sites!r}")
        # Each site must be able to encrypt at least values of magnitude 1.
        per_site_bits = self.data_modulus_bits - 1 - self.scale_bits - math.log2(self.max_sites)
        if self.scale_bits < 20 or per_site_bits < 0:
            raise CkksParamsError(
                f"scale_bits={self.scale_bits} must be >= 20 and at most data modulus bits "
                f"({self.data_modulus_bits}) - 1 - log2(max_sites={self.max_sites}) - log2(largest "
                "weighted value a site sends); lower scale_bits or max_sites"
            )

    @property
    def data_bit_sizes(self) -> tuple[int, ...]:
        """Primes a fresh ciphertext carries: all but SEAL's special prime (dropped if >1)."""
        bits = self.coeff_mod_bit_sizes
        return bits if len(bits) == 1 else bits[:-1]

    @property
    def data_modulus_bits(self) -> int:
        return sum(self.data_bit_sizes)

    @property
    def slot_count(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def values_per_ciphertext(self) -> int:
        """Slots minus the one that carries the integrity count."""
        return self.slot_count - 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "scale_bits": self.scale_bits,
            "max_sites": self.max_sites,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CkksParams:
        try:
            return cls(
                poly_modulus_degree=int(data["poly_modulus_degree"]),
                coeff_mod_bit_sizes=tuple(int(b) for b in data["coeff_mod_bit_sizes"]),
                scale_bits=int(data["scale_bits"]),
                max_sites=int(data["max_sites"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, CkksParamsError):
                raise
            raise CkksParamsError(f"invalid CKKS parameter record {dict(data)!r}: {exc}") from exc
