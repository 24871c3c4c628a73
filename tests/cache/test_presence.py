import random

import pytest

from tcmu_obd.cache.presence import PAGE_SIZE, PresenceMap

P = PAGE_SIZE


def _ref_runs(ref, a, b, size):
    if a >= b:
        return []
    out, cur = [], None
    last = (min(b, size) + P - 1) // P
    for i in range(a // P, last):
        if not ref[i] and cur is None:
            cur = i
        if ref[i] and cur is not None:
            out.append((cur, i))
            cur = None
    if cur is not None:
        out.append((cur, last))
    return [(x * P, min(y * P, size)) for x, y in out]


@pytest.mark.parametrize("seed", range(40))
def test_against_reference_model(seed):
    rnd = random.Random(seed)
    size = rnd.randint(0, 300) * P + rnd.choice([0, 1, P - 1])
    m = PresenceMap(size)
    ref = [False] * m.pages
    for _ in range(25):
        a = rnd.randint(0, size)
        b = rnd.randint(a, size)
        if rnd.random() < 0.7:
            m.mark(a, b)
            p0 = (a + P - 1) // P
            p1 = m.pages if b >= size else b // P
            for i in range(p0, max(p0, p1)):
                ref[i] = True
        else:
            m.clear(a, b)
            if a < b:
                for i in range(a // P, (b + P - 1) // P):
                    ref[i] = False
        assert [m.test(i) for i in range(m.pages)] == ref
        assert m.count_pages() == sum(ref)
        a = rnd.randint(0, size)
        b = rnd.randint(a, size)
        assert m.missing_runs(a, b) == _ref_runs(ref, a, b, size)
        assert m.is_present(a, b) == (not _ref_runs(ref, a, b, size))
        first = next((i * P for i in range(a // P, m.pages) if not ref[i]), None)
        assert m.first_missing(a) == first
    again = PresenceMap.from_bytes(m.to_bytes(), size)
    assert again is not None and again.bits == m.bits


def test_partial_pages_are_not_marked_and_last_short_page_is():
    m = PresenceMap(3 * P + 100)
    m.mark(1, P)  # first page not wholly written
    assert not m.test(0)
    m.mark(3 * P, 3 * P + 100)  # the short last page, written to the end
    assert m.test(3)
    assert m.present_bytes == 100
    m.mark(0, 3 * P + 100)
    assert m.complete and m.present_bytes == 3 * P + 100


def test_map_for_other_geometry_is_rejected():
    m = PresenceMap(10 * P)
    m.mark(0, 10 * P)
    data = m.to_bytes()
    assert PresenceMap.from_bytes(data, 11 * P) is None
    assert PresenceMap.from_bytes(data[:20], 10 * P) is None
    assert PresenceMap.from_bytes(b"X" + data[1:], 10 * P) is None
    assert PresenceMap.from_bytes(data, 10 * P).complete
