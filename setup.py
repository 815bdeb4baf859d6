"""Builds the compiled hot loops where a C compiler is there; everything else is in
pyproject.toml. Optional: without a compiler the install still succeeds and the Python runs
(``eventpulse.tables.ringread.ACCELERATED``, ``eventpulse.tables.batch.COMPILED_FOLD`` say so).

- ``eventpulse/tables/_ringread.pyx``: the read loop, a typed twin of ``ringread``'s Python;
- ``eventpulse/tables/fold.py``: the combiner's per-record fold, compiled as it is (plain Python
  whose local annotations Cython takes as C types: exact dicts and lists, C integers; beside it
  ``fold.pxd`` makes its ``HotFeature`` an extension type with C fields; the source behaves the
  same, tests/test_fold.py compares the two).
"""

from setuptools import Extension, setup

extensions = [
    Extension("eventpulse.tables._ringread", ["eventpulse/tables/_ringread.pyx"], optional=True),
    Extension("eventpulse.tables.fold", ["eventpulse/tables/fold.py"], optional=True),
]
try:  # pyproject.toml's build requirements have it; a build without isolation may not
    from Cython.Build import cythonize
except ImportError:
    setup()
else:
    setup(ext_modules=cythonize(extensions, compiler_directives={"language_level": 3}))
