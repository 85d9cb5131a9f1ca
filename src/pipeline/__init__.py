"""Simulation-based inference pipeline: simulate, train, sample, validate, report."""

__version__ = "0.1.0"
