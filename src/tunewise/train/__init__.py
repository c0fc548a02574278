"""Training recipes (LoRA SFT) and their components."""
