"""Supervised training: the trainer settings, the answer loss, launching over processes."""
