"""The pinned Cython compiler, as a Bazel tool."""
import sys

from Cython.Compiler.Main import setuptools_main

if __name__ == "__main__":
    sys.exit(setuptools_main())
