"""Pure-Python twin of native.zeropages: the reference behaviour, and the
fallback the differential tests and benchmarks compare against."""


def zero_pages(data: bytes | bytearray | memoryview, page_size: int) -> list[int]:
    """Indices of the all-zero pages of `data`; a short last page counts by its own bytes."""
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    view = memoryview(data).cast("B")
    zero_page = bytes(page_size)
    result = []
    for index, start in enumerate(range(0, len(view), page_size)):
        page = view[start:start + page_size]
        if page == zero_page[: len(page)]:
            result.append(index)
    return result
