"""Readers for the real data sets the models train on. They parse the files' own formats and never
download anything: data comes from `data_root()` (the STEPFUSION_DATA directory, else ../shared/data
next to the checkout) or from a path the user gives."""

from .paths import data_root, resolve_data_path

__all__ = ["data_root", "resolve_data_path"]
