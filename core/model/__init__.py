"""The universal ViT: SAC operators, the model and its size registry, backbone checkpoints, and
converters that import third-party weights (timm, PUMIT). Depends on torch only; ``sizes`` (the
architecture dataclass and the named sizes) not even on torch."""
