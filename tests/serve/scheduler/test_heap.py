"""serve/scheduler/heap.py: `trim_heap` gives back what glibc keeps after a request's large arrays are freed."""

from __future__ import annotations

from tests.peak_rss import MB, NEEDS_PEAK_RESET, measure


pytestmark = NEEDS_PEAK_RESET


def test_trim_heap_gives_back_what_glibc_keeps():
    """The pattern of a request on the preparing thread: large arrays freed among small survivors stay resident
    (209 MB here) until `trim_heap`."""
    got = measure("""
import threading
import numpy as np
from edgevl.serve.scheduler.heap import trim_heap
base, survivors = status("VmRSS"), []
def request():
    first = np.ones((24 << 20) // 8)
    del first                               # a freed mmapped chunk raises glibc's mmap threshold: later ones stay
    arrays = []
    for _ in range(12):
        arrays.append(np.ones((20 << 20) // 8))
        survivors.append(np.ones(100))      # small objects that outlive the request
thread = threading.Thread(target=request)
thread.start()
thread.join()
held = status("VmRSS") - base
trim_heap()
report(held=held, trimmed=status("VmRSS") - base)
""")
    assert got["held"] > 100 * MB, got          # what glibc keeps (not a promise of glibc's: the test's premise)
    assert got["trimmed"] < 20 * MB, got
