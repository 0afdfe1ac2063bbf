"""`fluxmini serve` on the tiny model, driven by the official `openai` client over real HTTP.

Every server is a subprocess on 127.0.0.1 with a free port. Images are compared bit for bit
with `FluxMini.generate` in this process for the same parameters (both with 1 thread).
"""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import openai
import pytest
from PIL import Image

import fluxmini
from fluxmini.server import params, preview

import make_pipeline_goldens as ref
from serverutil import API_KEY, LiveServer, proc_status_mb, pythonpath, request


@pytest.fixture(scope="module")
def model_path():
    return ref.model_path()


@pytest.fixture(scope="module")
def tiny(model_path):
    return fluxmini.FluxMini.load(str(model_path), threads=1)


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    s = LiveServer(model_path, "--api-key", API_KEY, "--alias", "flux-tiny", "--max-body-mb", "1",
                   log_dir=tmp_path_factory.mktemp("serve"))
    yield s
    s.stop()
    assert "Traceback" not in s.log(), s.log()


def client(server, key=API_KEY) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=server.url + "/v1", max_retries=0, timeout=120)


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def png_text(b64: str) -> dict:
    return fluxmini.read_metadata(Image.open(io.BytesIO(base64.b64decode(b64))))


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


# =========================================================================== happy paths


def test_health_and_models(server, model_path):
    h = server.health()
    assert h["status"] == "ok" and h["model"] == "flux-tiny" and h["model_file"] == model_path.name
    assert h["queue_length"] == 0 and h["max_queue"] == 8
    models = client(server).models.list()
    assert [m.id for m in models.data] == ["flux-tiny"]
    assert client(server).models.retrieve("flux-tiny").id == "flux-tiny"
    with pytest.raises(openai.NotFoundError):
        client(server).models.retrieve("dall-e-3")


def test_generate_n2_extra_body_seeds_equal_generate(server, tiny):
    prompt = "a photo of a cat"
    extra = {"seed": 7, "steps": 3, "guidance": 2.5, "t5_length": 32}
    r = client(server).images.generate(model="flux-tiny", prompt=prompt, n=2, size="64x48", extra_body=extra,
                                       quality="high", style="vivid", user="someone")  # ignored OpenAI fields
    assert r.created > 0 and len(r.data) == 2
    for k, item in enumerate(r.data):
        want = tiny.generate(prompt, width=64, height=48, steps=3, guidance=2.5, seed=7 + k, t5_length=32,
                             progress=False)
        np.testing.assert_array_equal(pixels(item.b64_json), np.asarray(want))
        meta = png_text(item.b64_json)
        assert meta["seed"] == 7 + k and meta["steps"] == 3 and meta["guidance"] == 2.5
        assert meta["prompt"] == prompt and meta["width"] == 64 and meta["height"] == 48 and meta["t5_length"] == 32


def test_compat_and_jpeg(server, tiny):
    r = client(server).images.generate(prompt="a lovely cat", size="64x64", output_format="jpeg",
                                       output_compression=90, extra_body={"seed": 3, "steps": 2, "compat": "llama-box"})
    raw = base64.b64decode(r.data[0].b64_json)
    assert raw[:3] == b"\xff\xd8\xff"  # a JPEG
    want = tiny.generate("a lovely cat", width=64, height=64, steps=2, seed=3, compat="llama-box", progress=False)
    buf = io.BytesIO()
    want.save(buf, format="JPEG", quality=90)  # same encoder, same quality: same bytes
    assert raw == buf.getvalue()


def test_edit_with_image_equals_img2img(server, tiny):
    init = ref.init_image(64, 64)
    extra = {"strength": 0.6, "seed": 11, "steps": 5, "t5_length": 64}
    r = client(server).images.edit(image=("init.png", png_bytes(init), "image/png"), prompt="a watercolour",
                                   extra_body=extra)
    want = tiny.generate("a watercolour", init_image=Image.fromarray(init), strength=0.6, seed=11, steps=5,
                         t5_length=64, width=64, height=64, progress=False)
    np.testing.assert_array_equal(pixels(r.data[0].b64_json), np.asarray(want))
    assert png_text(r.data[0].b64_json)["mode"] == "img2img"
    # several images (sent as image[]): the first is used; size resizes it
    other = np.zeros((32, 48, 3), np.uint8)
    r2 = client(server).images.edit(image=[("a.png", png_bytes(init), "image/png"), ("b.png", png_bytes(other), "image/png")],
                                    prompt="a watercolour", size="64x64", extra_body=extra)
    np.testing.assert_array_equal(pixels(r2.data[0].b64_json), np.asarray(want))


def test_url_response(server, tiny):
    r = client(server).images.generate(prompt="url", size="32x32", response_format="url",
                                       extra_body={"seed": 1, "steps": 2})
    url = r.data[0].url
    assert url.startswith(server.url + "/v1/images/files/") and url.endswith(".png")
    status, headers, body = request("GET", server.port, url[len(server.url):])
    assert status == 200 and headers["content-type"] == "image/png"
    want = tiny.generate("url", width=32, height=32, steps=2, seed=1, progress=False)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(body)).convert("RGB")), np.asarray(want))
    status, _, body = request("GET", server.port, "/v1/images/files/nosuchimage.png")
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"


def test_stream_progress_previews_and_final_image(server, tiny):
    steps = 4
    latents = []
    want = tiny.generate("stream", width=64, height=32, steps=steps, seed=5, progress=False,
                         callback=lambda s, t, x: latents.append(x) or True)
    events = list(client(server).images.generate(prompt="stream", size="64x32", stream=True, partial_images=2,
                                                 extra_body={"seed": 5, "steps": steps}))
    types = [e.type for e in events]
    progress = [e for e in events if e.type == "fluxmini.progress"]
    partial = [e for e in events if e.type == "image_generation.partial_image"]
    assert [(e.step, e.total) for e in progress] == [(s, steps) for s in range(1, steps + 1)]
    assert [e.partial_image_index for e in partial] == [0, 1]
    assert types[-1] == "image_generation.completed" and types.count("image_generation.completed") == 1
    final = events[-1]
    assert final.size == "64x32" and final.output_format == "png"
    np.testing.assert_array_equal(pixels(final.b64_json), np.asarray(want))
    # previews after steps 1 and 3 of 4 (preview_steps spreads them): the latent projected by the
    # published table, each latent pixel an 8x8 block
    assert preview.preview_steps(steps, 2) == {1, 3}
    for e, step in zip(partial, (1, 3)):
        rgb = np.einsum("chw,ck->hwk", latents[step - 1].astype(np.float64), preview.FACTORS.astype(np.float64))
        expect = np.clip((rgb + preview.BIAS + 1.0) * 127.5, 0, 255).astype(np.uint8)
        expect = expect.repeat(8, axis=0).repeat(8, axis=1)
        got = pixels(e.b64_json)
        assert got.shape == (32, 64, 3)
        assert np.abs(got.astype(int) - expect.astype(int)).max() <= 1  # float32 vs float64 rounding


def test_stream_edit_events_and_progress_off(server):
    init = ref.init_image(32, 32)
    events = list(client(server).images.edit(image=("i.png", png_bytes(init), "image/png"), prompt="x", stream=True,
                                             partial_images=1, extra_body={"steps": 4, "progress": False}))
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]


def test_preview_table_hand_checked():
    # one-hot channel c at 1.0 -> (FACTORS[c] + BIAS + 1) * 127.5, truncated
    lat = np.zeros((16, 1, 2), np.float32)
    lat[4, 0, 0] = 1.0  # channel 4: [0.0859, 0.0721, 0.0329]
    rgb = preview.latent_to_rgb(lat)
    assert rgb[0, 0].tolist() == [int((0.0859 - 0.0329 + 1) * 127.5), int((0.0721 - 0.0718 + 1) * 127.5),
                                  int((0.0329 - 0.0851 + 1) * 127.5)]
    assert rgb[0, 1].tolist() == [int((1 - 0.0329) * 127.5), int((1 - 0.0718) * 127.5), int((1 - 0.0851) * 127.5)]
    assert preview.preview_steps(20, 0) == set() and preview.preview_steps(1, 3) == set()
    assert preview.preview_steps(4, 10) == {1, 2, 3}


# =========================================================================== errors


def _error_body(exc) -> dict:
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in exc.response.text and body["error"]["message"]
    return body["error"]


BAD_GENERATE = [
    (dict(size="65x64"), "size"),
    (dict(size="big"), "size"),
    (dict(size="2048x2048"), "size"),
    (dict(n=0), "n"),
    (dict(n=11), "n"),
    (dict(response_format="gif"), "response_format"),
    (dict(output_format="bmp"), "output_format"),
    (dict(output_compression=101), "output_compression"),
    (dict(prompt="x" * 4001), "prompt"),
    (dict(extra_body={"steps": 0}), "steps"),
    (dict(extra_body={"steps": 101}), "steps"),
    (dict(extra_body={"steps": "4"}), "steps"),
    (dict(extra_body={"seed": -1}), "seed"),
    (dict(extra_body={"seed": 2 ** 64}), "seed"),
    (dict(extra_body={"seed": True}), "seed"),
    (dict(extra_body={"guidance": "high"}), "guidance"),
    (dict(extra_body={"t5_length": 0}), "t5_length"),
    (dict(extra_body={"compat": "comfy"}), "compat"),
    (dict(extra_body={"strength": 0.5}), "strength"),  # an edit field: unknown here
    (dict(extra_body={"setps": 4}), "setps"),
    (dict(extra_body={"prompt": 5}), "prompt"),
]


@pytest.mark.parametrize("kwargs,param", BAD_GENERATE, ids=[p for _, p in BAD_GENERATE])
def test_generate_400s(server, kwargs, param):
    kwargs = {"prompt": "x", "size": "32x32", **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client(server).images.generate(**kwargs)
    err = _error_body(e.value)
    assert e.value.status_code == 400 and err["param"] == param and err["type"] == "invalid_request_error"


def test_edit_400s(server):
    good = ("i.png", png_bytes(ref.init_image(32, 32)), "image/png")
    cases = [
        (dict(image=("i.png", b"this is not an image", "image/png")), "image"),
        (dict(image=("i.png", png_bytes(ref.init_image(32, 32))[:60], "image/png")), "image"),  # truncated
        (dict(image=good, mask=good), "mask"),
        (dict(image=good, extra_body={"strength": 1.5}), "strength"),
        (dict(image=good, extra_body={"strength": "lots"}), "strength"),
        (dict(image=good, n=0), "n"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client(server).images.edit(prompt="x", **kwargs)
        assert _error_body(e.value)["param"] == param, kwargs
    # a bomb: 20000x20000 declared in a tiny PNG
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")
    with pytest.raises(openai.BadRequestError) as e:
        client(server).images.edit(prompt="x", image=("b.png", buf.getvalue(), "image/png"))
    assert _error_body(e.value)["code"] == "image_too_large"


def test_401_404_413_and_raw_mistakes(server):
    with pytest.raises(openai.AuthenticationError) as e:
        client(server, key="wrong-key").images.generate(prompt="x", size="32x32")
    assert _error_body(e.value)["code"] == "invalid_api_key" and e.value.status_code == 401
    status, _, body = request("POST", server.port, "/v1/images/generations", body={"prompt": "x"})  # no key
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as e:
        client(server).images.generate(model="dall-e-3", prompt="x")
    assert _error_body(e.value)["code"] == "model_not_found"
    # body over --max-body-mb 1
    big = ("big.png", b"\x89PNG" + bytes(1_200_000), "image/png")
    with pytest.raises((openai.APIStatusError, openai.APIConnectionError)) as e:
        client(server).images.edit(prompt="x", image=big)
    if isinstance(e.value, openai.APIStatusError):  # the server may answer before the whole body is sent
        assert e.value.status_code == 413 and _error_body(e.value)["code"] == "request_too_large"
    auth = {"Authorization": f"Bearer {API_KEY}"}
    status, _, body = request("POST", server.port, "/v1/images/generations", body=b"x" * 1_100_000,
                              headers={**auth, "Content-Type": "application/json"})
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    # raw mistakes the client would not make
    for raw in (b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe", b"{}"):
        status, _, body = request("POST", server.port, "/v1/images/generations", body=raw,
                                  headers={**auth, "Content-Type": "application/json"})
        assert status == 400 and "Traceback" not in body.decode(errors="replace"), raw
    status, _, body = request("POST", server.port, "/v1/images/edits", body={"prompt": "x"}, headers=auth)
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_content_type"
    status, _, body = request("POST", server.port, "/v1/images/edits", body=b"--x\r\ngarbage",
                              headers={**auth, "Content-Type": "multipart/form-data; boundary=x"})
    assert status == 400, body
    # a file path given as text is never read: image must be an uploaded file
    form = (b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n'
            b'--b\r\nContent-Disposition: form-data; name="image"\r\n\r\n/etc/passwd\r\n--b--\r\n')
    status, _, body = request("POST", server.port, "/v1/images/edits", body=form,
                              headers={**auth, "Content-Type": "multipart/form-data; boundary=b"})
    assert status == 400 and json.loads(body)["error"]["param"] == "image"
    # CORS is off unless asked for
    _, headers, _ = request("GET", server.port, "/health", headers={"Origin": "http://evil.example"})
    assert not any(k.startswith("access-control-") for k in headers)
    status, _, body = request("GET", server.port, "/v1/nothing/here", headers=auth)
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
    status, _, body = request("GET", server.port, "/v1/images/generations", headers=auth)
    assert status == 405 and json.loads(body)["error"]["type"] == "invalid_request_error"
    # the page and the health check need no key; /v1 does
    assert request("GET", server.port, "/")[0] == 200
    assert request("GET", server.port, "/v1/models")[0] == 401
    assert server.health()["failed"] == 0  # no mistake reached the worker as a failure


def test_core_package_does_not_import_the_server_stack():
    code = ("import sys, fluxmini, fluxmini.cli; fluxmini.cli.build_parser();"
            "bad = [m for m in ('fastapi', 'uvicorn', 'starlette', 'multipart', 'python_multipart') if m in sys.modules];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": pythonpath()}, timeout=60)


def test_missing_server_extra_message(monkeypatch, capsys, model_path):
    import importlib.util

    from fluxmini import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert cli.main(["serve", "-m", str(model_path)]) == 2
    err = capsys.readouterr().err
    assert 'pip install "fluxmini[server]"' in err and "fastapi" in err and "Traceback" not in err


def test_bad_serve_flags(capsys, model_path):
    from fluxmini import cli

    for flags in (["--max-size", "1000"], ["--max-queue", "-1"], ["--port", "70000"], ["--api-key", " "]):
        assert cli.main(["serve", "-m", str(model_path), *flags]) == 2
        assert "error:" in capsys.readouterr().err


def test_params_form_conversion():
    req = params.from_form({"prompt": "p", "n": "2", "seed": "5", "strength": "0.25", "stream": "true",
                            "size": "32x48"}, max_size=64)
    assert (req.n, req.seed, req.strength, req.stream, req.width, req.height) == (2, 5, 0.25, True, 32, 48)
    assert params.from_form({"prompt": "p"}, max_size=64).width is None  # the image's size decides
    with pytest.raises(params.ApiError, match="'n' must be an integer"):
        params.from_form({"prompt": "p", "n": "two"}, max_size=64)
    with pytest.raises(params.ApiError, match="seed"):  # seed + n - 1 beyond 64 bits
        params.from_json({"prompt": "p", "seed": 2 ** 64 - 1, "n": 2}, max_size=64)


# =========================================================================== concurrency


def _generate_timed(server, results, i, barrier, body):
    c = client(server)
    barrier.wait()
    t0 = time.perf_counter()
    try:
        c.images.generate(**body)
        results[i] = (200, time.perf_counter() - t0, None)
    except openai.RateLimitError as e:
        results[i] = (429, time.perf_counter() - t0, e.response.headers.get("retry-after"))
    except Exception as e:  # anything else is a lost or broken request: recorded, asserted below
        results[i] = (repr(e), time.perf_counter() - t0, None)


def test_load_50_clients_against_queue_8(model_path, tiny, tmp_path):
    clients, max_queue = 60, 8
    s = LiveServer(model_path, "--max-queue", max_queue, "--api-key", API_KEY, log_dir=tmp_path)
    try:
        body = dict(prompt="load", size="32x32", extra_body={"seed": 9, "steps": 2})
        client(s).images.generate(**body)  # weights load on first use: measure memory after that
        rss0 = proc_status_mb(s.pid, "VmRSS")
        results, peaks, wall = [], [], 0.0
        for burst in range(2):  # the same burst twice: memory must not grow with the request count
            part = [None] * clients
            barrier = threading.Barrier(clients)
            threads = [threading.Thread(target=_generate_timed, args=(s, part, i, barrier, body))
                       for i in range(clients)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join(600)
            wall += time.perf_counter() - t0
            assert all(not t.is_alive() for t in threads)
            statuses = [r[0] for r in part]
            assert all(st in (200, 429) for st in statuses), [st for st in statuses if st not in (200, 429)]
            assert statuses.count(200) >= 1 + max_queue  # the running one and a full queue were served
            assert statuses.count(429) > 0  # the burst did overflow the queue
            results += part
            peaks.append(proc_status_mb(s.pid, "VmHWM"))
        statuses = [r[0] for r in results]
        ok, busy = statuses.count(200), statuses.count(429)
        assert ok + busy == 2 * clients  # none lost
        assert all(r[2] is not None and int(r[2]) >= 1 for r in results if r[0] == 429)  # Retry-After
        lat = sorted(r[1] for r in results if r[0] == 200)
        h = s.health()
        assert h["queue_length"] == 0 and not h["running"] and h["done"] == ok + 1 and h["rejected"] == busy
        # bounded memory: the first burst's peak over the warm server (measured +24 MiB on the tiny model), and
        # the second burst adds (almost) nothing to it
        assert peaks[0] - rss0 < 150 and peaks[1] - peaks[0] < 20, (rss0, peaks)
        # serves normally afterwards, still bit-exact
        r = client(s).images.generate(prompt="after", size="64x64", extra_body={"seed": 2, "steps": 2})
        want = tiny.generate("after", width=64, height=64, steps=2, seed=2, progress=False)
        np.testing.assert_array_equal(pixels(r.data[0].b64_json), np.asarray(want))
        print(f"\nLOAD: 2 bursts of {clients} concurrent requests: {ok} x 200, {busy} x 429, wall {wall:.1f} s, 200 latency "
              f"p50 {np.percentile(lat, 50):.2f} s p95 {np.percentile(lat, 95):.2f} s, 429 latency max "
              f"{max((r[1] for r in results if r[0] == 429), default=0):.3f} s, server RSS {rss0:.0f} MiB warm, "
              f"peak {peaks[0]:.0f} MiB after burst 1, {peaks[1]:.0f} MiB after burst 2")
    finally:
        s.stop()
    assert "Traceback" not in s.log(), s.log()


def _raw_post(port: int, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def _wait(pred, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_disconnect_cancels_only_that_request(model_path, tiny, tmp_path):
    s = LiveServer(model_path, "--api-key", API_KEY, log_dir=tmp_path)
    try:
        long_steps = 100
        # A: a long streamed generation; read until it has run 2 steps
        a = _raw_post(s.port, {"prompt": "a", "size": "256x256", "steps": long_steps, "seed": 1, "stream": True})
        seen = b""
        while b'"step":2' not in seen:
            chunk = a.recv(65536)
            assert chunk, seen
            seen += chunk
        # C: queued behind A, then its client goes away before it starts
        c = _raw_post(s.port, {"prompt": "c", "size": "64x64", "steps": 3, "seed": 3})
        _wait(lambda: s.health()["queue_length"] == 1, "C queued")
        # B: queued behind C, must come back intact
        out = {}

        def run_b():
            out["b"] = client(s).images.generate(prompt="b", size="64x64", extra_body={"seed": 4, "steps": 3})

        tb = threading.Thread(target=run_b)
        tb.start()
        _wait(lambda: s.health()["queue_length"] == 2, "B queued")
        c.close()
        _wait(lambda: s.health()["queue_length"] == 1, "C dropped from the queue")
        assert s.health()["running"]  # A still runs
        a.close()  # A's client goes away mid-generation
        tb.join(120)
        want = tiny.generate("b", width=64, height=64, steps=3, seed=4, progress=False)
        np.testing.assert_array_equal(pixels(out["b"].data[0].b64_json), np.asarray(want))
        h = s.health()
        assert h["cancelled"] == 2 and h["done"] == 1 and h["failed"] == 0, h
        # A stopped at the next step: far fewer than its 60 steps ran (B ran 3, C none)
        assert h["steps_run"] - 3 < long_steps // 2, h
        print(f"\nCANCEL: A ran {h['steps_run'] - 3} of {long_steps} steps before it stopped")
    finally:
        s.stop()
    assert "Traceback" not in s.log(), s.log()
