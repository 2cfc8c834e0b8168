"""Checkpoint contents: the EMA and training weights of EMA checkpoints (:mod:`.ema`)."""
