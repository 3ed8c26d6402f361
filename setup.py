# A shim for tools that still call setup.py (pybuild, rpm's %py3_* macros); the
# metadata lives in setup.cfg.
from setuptools import setup

setup()
