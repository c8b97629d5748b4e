"""The package version and the oldest torch it runs on: setup.py reads both from this file as text,
mxd_fast/__init__.py imports them."""
__version__ = "0.1.0"
# the oldest release the test suites have passed on (torch 2.9.1 with triton 3.5.1; also 2.11, 2.13, 2.14)
MIN_TORCH = "2.9"
