"""LoRA adapters on the universal ViT (through peft) and the adapter wire format: the only
tensors that leave a site. Depends on ``core.model``."""
