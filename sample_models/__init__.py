"""Small, deterministic models shipped with the repo so demos and tests have real checkpoints."""
