"""`edgevl serve`: the real server on a loopback port, driven by the openai client and raw HTTP."""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

openai = pytest.importorskip("openai")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_artifact):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edgevl", "serve", str(tiny_artifact), "--port", str(port),
                             "--model-name", "tiny", "--max-request-mb", "1", "--max-image-pixels", "1000000",
                             "--max-video-mb", "0.5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail(f"server did not start: {proc.stderr.read()}")
    yield base
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def data_url(path, size=None) -> str:
    image = Image.open(path).convert("RGB")
    if size:
        image = image.resize(size)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def video_data_url(path) -> str:
    return "data:video/quicktime;base64," + base64.b64encode(path.read_bytes()).decode()


def video_message(text, url):
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def image_message(text, url):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def test_health_and_models(server, client):
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completion_with_image_equals_the_runtime(client, pipeline, photos):
    r = client.chat.completions.create(model="tiny", messages=image_message("What is this?",
                                                                            data_url(photos["coffee"])),
                                       max_tokens=8, temperature=0)
    from PIL import Image as PILImage
    expected = pipeline.generate("What is this?", images=[PILImage.open(photos["coffee"]).convert("RGB")],
                                 max_new_tokens=8, do_sample=False)
    assert r.choices[0].message.content == expected.text
    assert r.usage.completion_tokens == len(expected.token_ids)
    assert r.usage.prompt_tokens == len(expected.prompt_token_ids)


def test_streaming_matches_non_streaming(client):
    messages = [{"role": "user", "content": "Tell me a story."}]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=12,
                                                 temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert len(chunks) > 3  # really streamed, not one blob


def test_concurrent_requests_get_independent_answers(client):
    prompts = ["Describe a cat.", "What is the capital of France?", "Count to five.", "Write a haiku."]

    def ask(prompt):
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                           max_tokens=10, temperature=0)
        return r.choices[0].message.content

    sequential = [ask(p) for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(ask, prompts))
    assert concurrent == sequential
    assert len(set(sequential)) > 1


def test_seeded_sampling_is_reproducible(client):
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "Say anything."}], max_tokens=10,
                  temperature=1.0, top_p=0.95, seed=11)
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    b = client.chat.completions.create(**kwargs).choices[0].message.content
    assert a == b


def test_multi_turn_messages_and_stop(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Tell me more."}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    text = full.choices[0].message.content
    stop = text[4:6]
    cut = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0, stop=stop)
    assert cut.choices[0].message.content == text[:text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def _post(server, body, **kwargs):
    return httpx.post(f"{server}/v1/chat/completions", content=body,
                      headers={"content-type": "application/json"}, timeout=60, **kwargs)


def test_malformed_json_is_a_400(server):
    r = _post(server, b'{"model": "tiny", "messages": [')
    assert r.status_code == 400
    assert "JSON" in r.json()["error"]["message"]


def test_missing_messages_is_a_400(server):
    r = _post(server, json.dumps({"model": "tiny"}))
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]


def test_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert "gpt-9" in str(e.value)


def test_oversized_image_is_rejected(server, tmp_path):
    big = tmp_path / "big.png"
    Image.new("RGB", (1200, 1000), (40, 90, 200)).save(big)   # 1.2 MP, a few KB: over the pixel limit only
    body = {"model": "tiny", "messages": image_message("x", data_url(big))}
    r = _post(server, json.dumps(body))
    assert r.status_code == 413 and "pixels" in r.json()["error"]["message"]


def test_oversized_request_is_rejected(server):
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "a" * (2 * 1024 * 1024)}]})
    r = _post(server, body)
    assert r.status_code == 413


def test_bad_image_data_and_local_paths(server, photos):
    bad = {"model": "tiny", "messages": image_message("x", "data:image/png;base64,!!!notbase64")}
    assert _post(server, json.dumps(bad)).status_code == 400
    junk = {"model": "tiny", "messages": image_message("x", "data:image/png;base64,"
                                                       + base64.b64encode(b"not an image").decode())}
    assert _post(server, json.dumps(junk)).status_code == 400
    local = {"model": "tiny", "messages": image_message("x", str(photos["coffee"]))}
    r = _post(server, json.dumps(local))
    assert r.status_code == 400 and "--allow-local-files" in r.json()["error"]["message"]


def test_server_survives_bad_requests(server, client):
    _post(server, b"\xff\xfe garbage")
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "still there?"}],
                                       max_tokens=3, temperature=0)
    assert r.choices[0].message.content is not None


def test_completion_with_video_equals_the_runtime(client, pipeline, video_file):
    r = client.chat.completions.create(model="tiny", messages=video_message("What happens?",
                                                                            video_data_url(video_file)),
                                       max_tokens=8, temperature=0)
    expected = pipeline.generate("What happens?", videos=[video_file], max_new_tokens=8, do_sample=False)
    assert r.choices[0].message.content == expected.text
    assert r.usage.completion_tokens == len(expected.token_ids)
    assert r.usage.prompt_tokens == len(expected.prompt_token_ids)


def _one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith(".") and ". " not in message[:-1]


def test_remote_and_local_video_urls_are_refused(server, video_file):
    r = _post(server, json.dumps({"model": "tiny", "messages": video_message("x", "https://example.com/a.mp4")}))
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "remote video URLs" in message and _one_sentence(message)
    r = _post(server, json.dumps({"model": "tiny", "messages": video_message("x", str(video_file))}))
    assert r.status_code == 400 and "--allow-local-files" in r.json()["error"]["message"]


def test_oversized_video_is_a_413(server):
    url = "data:video/mp4;base64," + base64.b64encode(bytes(600 * 1024)).decode()   # over 0.5 MiB, under 1 MiB
    r = _post(server, json.dumps({"model": "tiny", "messages": video_message("x", url)}))
    assert r.status_code == 413 and "bytes per video" in r.json()["error"]["message"]


def test_video_frames_over_the_pixel_limit_are_a_413(server, tmp_path):
    import numpy as np

    from tests.data.video_frames import write_video
    write_video(tmp_path / "big.mov", np.zeros((4, 1008, 1008, 3), np.uint8), fps=2)   # 1.02 MP per frame
    body = {"model": "tiny", "messages": video_message("x", video_data_url(tmp_path / "big.mov"))}
    r = _post(server, json.dumps(body))
    assert r.status_code == 413 and "1008x1008" in r.json()["error"]["message"]


def test_undecodable_video_is_a_400(server):
    url = "data:video/mp4;base64," + base64.b64encode(b"not a video" * 50).decode()
    for stream in (False, True):    # decoded before a streamed reply starts: a real 4xx either way
        r = _post(server, json.dumps({"model": "tiny", "messages": video_message("x", url), "stream": stream}))
        assert r.status_code == 400
        message = r.json()["error"]["message"]
        assert message.startswith("the video could not be decoded") and "edgevl-video" not in message


def test_video_without_pyav_names_the_extra(monkeypatch):
    from edgevl.serve import requests
    from edgevl.serve.body import to_hf_messages
    from edgevl.serve.errors import RequestError
    from edgevl.serve.schemas import ChatCompletionRequest
    monkeypatch.setattr(requests, "_have_pyav", lambda: False)
    request = ChatCompletionRequest(model="tiny", messages=video_message("x", "data:video/mp4;base64,AAAA"))
    with pytest.raises(RequestError) as e:
        to_hf_messages(request, requests.RequestLimits())
    assert e.value.status == 400 and "pip install 'edgevl[video]'" in e.value.message
