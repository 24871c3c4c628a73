"""Only here to build the cffi extension (tcmu_obd.frontends.tcmu._libtcmu) at install time;
all metadata lives in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["csrc/build_tcmu.py:ffibuilder"])
