"""The package version: setup.py reads it from this file, mxd_fast/__init__.py imports it."""
__version__ = "0.1.0"
