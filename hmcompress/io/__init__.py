"""Files in and out: reading checkpoints safely (`checkpoint`, `picklescan`), compressing every
eligible tensor with bounded memory and worker processes (`pipeline`), and writing compressed,
dense and shim files atomically (`writer`); reading calibration stats files (`activations`)."""
