"""Who runs which request when: the continuous-batching scheduler over the in-place KV cache (batching.py), what it
keeps per row (slots.py), the one-at-a-time scheduler and what every scheduler takes and reports (jobs.py),
--prefix-cache's row keys (prefix_cache.py) and freed memory given back between requests (heap.py). Used by the
OpenAI server and the Triton model; the runtime itself imports nothing from here."""
