"""Differential-privacy planning (noise calibration), the per-site privacy ledger (the accountant
history that never resets) and the privacy report a data-protection officer reads. Imports no
model code."""
