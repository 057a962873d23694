"""Calibration: sparsity budgets chosen from measured quality, and quantized exports (int8 / int4)."""
