"""The QEMU driver: command line, accelerator choice, QMP, VM process lifecycle."""
