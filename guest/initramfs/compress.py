"""Compressing the initramfs: the guest kernel inflates it at every direct boot (and template boot).

Under TCG the kernel's decompressor runs emulated, so the format is chosen for how fast the guest
inflates it, not for size. Measured (direct boot to agent answered, interleaved, 4 boots each, the
same 18.8 MB archive): gzip 3.54 s, LZ4 (legacy frame) 3.22 s, uncompressed 3.25 s.
The price is in a template's memory file: the pages the kernel frees after unpacking keep their
bytes, so the factory's zero-page punching cannot drop them, and the kernel's LZ4 decompressor
frees an 8 MB output buffer besides the image (gzip streams through a 32 KB window). Measured:
86.5 MiB allocated with gzip, 95 with LZ4 (0.85 MiB more per clone with 10 clones alive); an
uncompressed archive would leave its whole 18.8 MB image behind instead.
"""

from __future__ import annotations

import gzip
import io
import shutil
import subprocess

# The kernel's LZ4 initramfs decompressor reads only the legacy frame format (`lz4 -l`).
LZ4_COMMAND = ("lz4", "-l", "-9", "-c", "-q")
# Level 9: the best gzip ratio; only used when asked for (--compression gzip).
GZIP_LEVEL = 9
METHODS = ("lz4", "gzip", "none")
DEFAULT_METHOD = "lz4"


class CompressionError(Exception):
    pass


def compress(raw: bytes, method: str) -> bytes:
    """The archive `raw` in `method` (one of METHODS); the same input gives the same bytes."""
    if method == "none":
        return raw
    if method == "gzip":
        out = io.BytesIO()
        # mtime=0 and no file name in the gzip header: part of being reproducible.
        with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=GZIP_LEVEL, mtime=0) as gz:
            gz.write(raw)
        return out.getvalue()
    if method == "lz4":
        return _lz4_legacy(raw)
    raise CompressionError(f"initramfs compression {method!r} is not one of {', '.join(METHODS)}")


def _lz4_legacy(raw: bytes) -> bytes:
    if shutil.which(LZ4_COMMAND[0]) is None:
        raise CompressionError("the lz4 command is missing: install it (apt-get install lz4, as tools/bootstrap.sh "
                               "does) or build with --compression gzip")
    done = subprocess.run(LZ4_COMMAND, input=raw, capture_output=True, check=False)
    if done.returncode != 0:
        raise CompressionError(f"{' '.join(LZ4_COMMAND)} failed with status {done.returncode}: "
                               f"{done.stderr.decode(errors='replace').strip()}")
    return done.stdout
