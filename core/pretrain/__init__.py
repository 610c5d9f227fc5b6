"""Masked image modelling on unlabeled site images, and the demo backbone the default scenario
federates from. Depends on ``core.model``, ``core.data`` and ``core.training``."""
