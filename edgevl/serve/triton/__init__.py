"""`edgevl triton`: a Triton Inference Server model repository (Python backend) that runs the edgevl runtime.

    protocol.py     the request/response tensors and how a request becomes Pipeline arguments (checked by the
                    rules and in the words of the server's parser, serve/requests.py)
    repository.py   REPO/NAME/{config.pbtxt, 1/model.py[, 1/artifact/]}, written atomically
    model.py        the Python-backend model file copied into the repository (stdlib only until edgevl is on
                    the stub's path)
    handler.py      what model.py runs: Pipeline + scheduler per instance, streaming (decoupled) or one response

Nothing here imports Triton: `triton_python_backend_utils` exists only inside Triton's stub process and is
handed to the handler. See docs/triton.md.
"""
