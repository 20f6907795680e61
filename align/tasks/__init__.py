"""Synthetic tasks with verifiable answers: SFT data, preference pairs and rewards that make every
method in align/ measurable on a laptop."""
