"""The device runners' code paths driven on the CPU: a pipeline run on other runners for a with-block, and the
greedy tokens those tests compare."""

from __future__ import annotations


class Swapped:
    """Run a pipeline on other runners for the duration of a with-block."""

    def __init__(self, pipeline, vision, decoder):
        self.pipeline, self.runners = pipeline, (vision, decoder)

    def __enter__(self):
        self.saved = self.pipeline.vision, self.pipeline.decoder
        self.pipeline.vision, self.pipeline.decoder = self.runners

    def __exit__(self, *exc):
        self.pipeline.vision, self.pipeline.decoder = self.saved


def greedy_tokens(pipe, photo):
    return pipe.generate("Describe the image.", images=[photo], max_new_tokens=10, do_sample=False).token_ids
