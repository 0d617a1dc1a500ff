from setuptools import setup  # everything is in pyproject.toml; this shim serves tools that still call setup.py

setup()
