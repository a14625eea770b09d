"""Audit stage: suspected label errors in train and val, by confident learning on cross-fitted probabilities."""
