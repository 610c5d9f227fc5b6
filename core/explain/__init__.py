"""Where the model looks: per-token relevance maps for one input, computed at the site.

``relevance.py`` holds the methods (attention rollout, gradient-weighted attention, Grad-CAM on
the token grid) and the upsampling of a token map back onto the image grid with SAC's depth
rule; ``overlay.py`` renders PNG overlays. Depends on ``core.model`` only (plus peft to unwrap
an adapted model); nothing here sends anything anywhere.
"""
