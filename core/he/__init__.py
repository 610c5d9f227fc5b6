"""Homomorphic encryption of adapter updates (CKKS through TenSEAL): parameters, key contexts,
packing, encryption at the sites, ciphertext-only aggregation at the server. Imports no model
code; tenseal is imported lazily, where it is used."""
