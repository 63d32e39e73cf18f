"""`make bench`: speed and compression figures, each a ratio against a baseline run in-process."""
