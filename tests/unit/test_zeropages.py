"""The Cython zero-page scan agrees with its pure-Python twin on any input."""
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from native import zeropages, zeropages_pure


@st.composite
def memory_images(draw):
    page_size = draw(st.sampled_from([1, 2, 7, 64, 4096]))
    pages = draw(st.lists(st.one_of(
        st.just(b"\0" * page_size),
        st.binary(min_size=page_size, max_size=page_size),
    ), max_size=24))
    tail = draw(st.binary(max_size=page_size - 1)) if page_size > 1 else b""
    return b"".join(pages) + tail, page_size


@given(memory_images())
def test_cython_matches_pure_python(image):
    data, page_size = image
    assert zeropages.zero_pages(data, page_size) == zeropages_pure.zero_pages(data, page_size)


def test_finds_zero_pages_among_written_ones():
    page = 4096
    data = bytearray(page * 4)
    data[page + 100] = 1  # page 1 written
    data[4 * page - 1] = 7  # last byte of page 3
    assert zeropages.zero_pages(data, page) == [0, 2]


def test_a_single_nonzero_byte_anywhere_makes_a_page_nonzero():
    for offset in (0, 1, 2047, 4095):
        data = bytearray(4096)
        data[offset] = 0xFF
        assert zeropages.zero_pages(data, 4096) == []


@pytest.mark.parametrize("impl", [zeropages, zeropages_pure])
def test_rejects_a_non_positive_page_size(impl):
    with pytest.raises(ValueError, match="page_size must be positive, got 0"):
        impl.zero_pages(b"\0" * 8, 0)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
