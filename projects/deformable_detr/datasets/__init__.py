"""Data sets: the synthetic shapes generator (:mod:`.synthetic`)."""
