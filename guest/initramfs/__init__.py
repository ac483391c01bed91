"""Pieces of the guest image builder (guest/build_initramfs.py): cpio writer, kernel module
resolution, and the Python runtime closure."""
