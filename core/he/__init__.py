"""Homomorphic encryption of adapter updates (CKKS through TenSEAL), so the server averages what
it cannot read.

Protocol
--------
Provisioning makes one secret context that every site holds (handed out of band) and a public
context for the server that holds no key at all. A site multiplies its update by its example
count in plaintext, flattens the tensors in sorted key order, packs them into as few
ciphertexts as possible and encrypts them; it sends the ciphertexts, its count and a layout.
The server only adds the ciphertexts of whichever sites replied; the sites decrypt the sum,
check its count slots, divide by the total count and unflatten it into a state dict.

Modules, in the order a round uses them
---------------------------------------
``errors``      :class:`CkksError` and its subclasses (every failure of this package)
``params``      :class:`CkksParams`: ring, primes, scale, site budget (and why the defaults)
``seal``        the lazy TenSEAL/SEAL import and in-memory SEAL (de)serialisation
``context``     :class:`CkksContext` and the context byte format (fingerprint, secret file)
``keys``        provisioning and loading the context files (permissions, roles)
``packing``     :class:`CkksLayout`: state dict <-> flat vector of slots
``envelope``    one ciphertext on the wire, and the receiver's checks before and after SEAL
``encrypt``     the site: weight, pack, encrypt; decrypt the sum and check its count slots
``aggregate``   the server: add ciphertexts, naming and dropping bad uploads
``provenance``  upload tags and the sites' verdict naming a bad upload in a failed sum
``cli``         ``fedmedvit he provision | show``
``ckks``        the public names of all of the above in one import (for code outside)

Integrity and threat model
--------------------------
The server rejects what it can see is wrong (``envelope``: altered, truncated, misplaced, or
from another context or parameters). It cannot tell a ciphertext made with another secret key
under identical parameters: the sites can, by its count slot (``encrypt``), and
``provenance`` lets them name the bad upload so the server can sum again without it. Nothing
detects a site that encrypts wrong values under the right key (poisoning) or a server that
adds plaintext offsets: the threat model is an honest-but-curious server, and a site that
colludes with the server can decrypt everything (all sites share one key).

Importing ``core.he`` or any of its modules but ``packing``, ``encrypt``, ``aggregate`` and
``ckks`` (torch) loads no heavy library; tenseal is imported lazily, where it is used, and no
module imports model code or Flower.
"""
