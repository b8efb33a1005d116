"""The pre-training application: configuration, data, optimisation, the loop and its outputs."""
