"""Training: optimizer and freezing, train state, the jitted train step, FLOPs/MFU, metrics and the loop."""
