import runpy

from setuptools import setup

native = runpy.run_path("c/build_native.py")["setup_args"]()  # libmpumapclient, preload
setup(cffi_modules=["c/build_core.py:ffibuilder"], **native)
