"""Does a compressed model still do its job: task metric, output error, NTK and error propagation
(`analysis`), as tables (`tables`)."""
