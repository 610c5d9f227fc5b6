"""Local training loops (plain and Opacus DP-SGD) and evaluation metrics. Knows nothing of
federation: a site's round (``core.federation``) calls these."""
