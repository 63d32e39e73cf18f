"""hmcompress beside the methods users know: each baseline answers the same two questions about
a matrix (`baselines`), and `comparison` runs them all over a checkpoint."""
