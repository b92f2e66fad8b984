"""Loading, building and saving models: the packaged base, LoRA, dtype resolution."""
