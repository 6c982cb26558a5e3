"""deat: PGD adversarial training vs Diffusion Enhanced Adversarial Training (Sun et al., KDD 2023)."""

__version__ = "0.1.0"
