"""Triton kernels and their launchers, one file per op. Imported lazily: triton is optional."""
