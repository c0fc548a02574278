"""tunewise: decide whether to fine-tune, prepare the data, beat the baselines with evidence, ship."""

__version__ = "0.1.0"
