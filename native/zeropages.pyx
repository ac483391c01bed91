# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Finding all-zero pages in a guest memory image (template RAM file).

Pages a guest never wrote are zero; punching them out of the template's tmpfs
file gives memory back without changing what clones read. Twin of
native/zeropages_pure.py, which defines the behaviour.
"""
from libc.string cimport memcmp


def zero_pages(const unsigned char[::1] data, Py_ssize_t page_size):
    """Indices of the all-zero pages of `data`; a short last page counts by its own bytes."""
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    cdef Py_ssize_t size = data.shape[0]
    cdef Py_ssize_t start = 0
    cdef Py_ssize_t index = 0
    cdef Py_ssize_t length
    cdef const unsigned char* p
    result = []
    if size == 0:
        return result
    p = &data[0]
    while start < size:
        length = page_size if size - start >= page_size else size - start
        # A page is all zero iff its first byte is zero and every byte equals
        # the one before it: one overlapping memcmp, which libc vectorises.
        if p[start] == 0 and (length == 1 or memcmp(p + start, p + start + 1, length - 1) == 0):
            result.append(index)
        start += length
        index += 1
    return result
