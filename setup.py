from setuptools import setup

setup(cffi_modules=["c/build_core.py:ffibuilder"])
