"""Reliability harnesses: kill -9 trials, power-loss replay, broken-protocol switches, figures."""
