"""Models built from the package's public ops and modules."""
