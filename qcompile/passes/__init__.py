"""The pass pipeline, one module a pass, in order: capture, partition, calibrate, optimize, fold."""
