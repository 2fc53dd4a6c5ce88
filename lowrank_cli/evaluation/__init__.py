"""Measuring models: parameter and MAC counts, accuracy, the report (and its gates and plot), benchmarks."""
