"""The KV cache (runtime/kv_cache.py) on the runners that write it in place: every step writes its rows where they lie,
nothing is copied or reallocated, and a cut back to fewer positions keeps the buffers."""

from __future__ import annotations

import numpy as np

from edgevl.runtime.backends.ort import OrtIoBindingRunner
from edgevl.runtime.backends.ort_session import SessionFromOnnx


def test_the_in_place_cache_is_written_where_it_lies(pipeline, photos):
    """ort-cpu and the ort-cuda code path (on the CPU EP): past and present are the same memory; every step
    writes its rows by position and nothing is copied or reallocated (ort-cpu's one-row decode steps also write
    copies of the new row into the spare positions after it, which the next step overwrites)."""
    from edgevl.runtime.generate import decoder_step
    for decoder in (pipeline.decoder, OrtIoBindingRunner(SessionFromOnnx(pipeline.artifact.graph_path("decoder")),
                                                         device="cpu")):
        decoder.activate()
        cache = pipeline.new_cache(1)
        buffers = dict(cache.buffers)
        addresses = {k: (v.data_ptr(), v.array.ctypes.data) for k, v in buffers.items()}
        assert all(a == b for a, b in addresses.values())             # the OrtValue wraps the numpy memory
        rng = np.random.default_rng(0)
        before = None
        for step, n in enumerate((5, 1, 1)):
            embeds = rng.standard_normal((1, n, pipeline.config.hidden_size)).astype(np.float32)
            start = cache.length
            outputs = decoder_step(decoder, cache, embeds, np.tile(np.arange(start, start + n), (3, 1, 1)),
                                   np.array([n]))
            for name, buffer in cache.buffers.items():
                assert buffer is buffers[name] and buffer.data_ptr() == addresses[name][0]
                assert outputs[name.replace("past_key_values.", "present.")] is buffer
            key = buffers["past_key_values.0.key"].array
            spare = decoder.kv_spare_positions if n == 1 else 0   # ort-cpu's grouped decode steps write copies
            assert np.abs(key[:, :, start:start + n]).sum() > 0 and not key[:, :, start + n + spare:].any()
            assert np.array_equal(key[:, :, start + n:start + n + spare],
                                  np.repeat(key[:, :, start:start + 1], spare, axis=2))
            if before is not None:
                assert np.array_equal(key[:, :, :start], before)      # earlier rows untouched
            before = key[:, :, :start + n].copy()
        assert cache.length == 7
        cache.truncate(3)                                             # a chat cut back: nothing copied
        assert cache.length == 3 and cache.buffers["past_key_values.0.key"] is buffers["past_key_values.0.key"]
