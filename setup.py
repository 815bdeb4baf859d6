"""Builds the compiled read loop (``eventpulse/tables/_ringread.pyx``) where a C compiler is
there; everything else is in pyproject.toml. Optional: without a compiler the install still
succeeds and reads run the Python twin (``eventpulse.tables.ringread.ACCELERATED`` is False)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("eventpulse.tables._ringread", ["eventpulse/tables/_ringread.pyx"],
                             optional=True)])
