"""``edgellm serve`` with the real clients: tritonclient.http (binary tensors by default), plain JSON over HTTP, the
openai client streaming a chat; bad requests get the protocol's status and the server keeps serving."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest

import edgellm.runtime as rt
from tests.conftest import ROOT, import_blocker, run_cli
from tests.serve.conftest import API_KEY, Server

pytestmark = pytest.mark.slow  # builds kws-cnn and a tiny language model, starts servers (~40 s on 2 cores)

AUTH = {"Authorization": f"Bearer {API_KEY}"}  # tritonclient adds its own headers to the dict it gets: give it copies
MESSAGES = [{"role": "user", "content": "w7 w8 w9"}]


def triton(server):
    import tritonclient.http as th

    return th, th.InferenceServerClient(urlparse(server.url).netloc)


def triton_inputs(th, model, arrays, binary=True):
    inputs = []
    for spec in model.inputs:
        item = th.InferInput(spec.name, list(spec.shape), {"float32": "FP32", "int64": "INT64", "int32": "INT32"}[spec.dtype])
        item.set_data_from_numpy(arrays[spec.name], binary_data=binary)
        inputs.append(item)
    return inputs


def ok(server, kws_pkg):
    """The server still answers: ready, and a correct inference."""
    model = rt.load(kws_pkg)
    x = model.example_inputs()["features"]
    r = httpx.post(f"{server.url}/v2/models/kws/infer", headers=AUTH, timeout=60,
                   json={"inputs": [{"name": "features", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]})
    assert r.status_code == 200, r.text
    assert np.allclose(r.json()["outputs"][0]["data"], model.run(features=x)["logits"].ravel(), atol=1e-6)
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200


def test_tritonclient_round_trips_the_reference_sample(server, kws_pkg):
    th, client = triton(server)
    model = rt.load(kws_pkg)
    sample = model.example_inputs()
    expected = model.run(**sample)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("kws", headers=AUTH)
    meta = client.get_model_metadata("kws", headers=AUTH)
    assert meta["inputs"] == [{"name": s.name, "datatype": "FP32", "shape": list(s.shape)} for s in model.inputs]
    assert [o["name"] for o in meta["outputs"]] == list(expected)
    for binary in (True, False):  # the default (binary tensors both ways), then JSON both ways
        outputs = None if binary else [th.InferRequestedOutput(n, binary_data=False) for n in expected]
        result = client.infer("kws", triton_inputs(th, model, sample, binary), outputs=outputs, headers=dict(AUTH), request_id="r1")
        assert result.get_response()["id"] == "r1"
        for name, array in expected.items():
            got = result.as_numpy(name)
            assert got.dtype == array.dtype and got.shape == array.shape
            np.testing.assert_allclose(got, array, rtol=0, atol=1e-6)
    gzipped = client.infer("kws", triton_inputs(th, model, sample), headers=dict(AUTH), request_compression_algorithm="gzip")
    np.testing.assert_allclose(gzipped.as_numpy("logits"), expected["logits"], rtol=0, atol=1e-6)
    with pytest.raises(Exception, match="400") as e:  # a language model is not a v2 tensor model
        client.get_model_metadata("chat", headers=AUTH)
    assert "/v1/chat/completions" in str(e.value)


def test_json_infer_over_plain_http(server, kws_pkg):
    model = rt.load(kws_pkg)
    x = model.example_inputs()["features"]
    body = {"id": "7", "inputs": [{"name": "features", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}],  # nested rows
            "outputs": [{"name": "logits"}]}
    r = httpx.post(f"{server.url}/v2/models/kws/versions/1/infer", headers=AUTH, json=body, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    reply = r.json()
    out = reply["outputs"][0]
    assert (reply["model_name"], reply["id"], out["datatype"], out["shape"]) == ("kws", "7", "FP32", [1, 12])
    np.testing.assert_allclose(np.asarray(out["data"], np.float32), model.run(features=x)["logits"].ravel(), rtol=0, atol=1e-6)


def test_openai_client_streams_the_chat_text(server, chat_pkg):
    import openai

    lm = rt.load(chat_pkg)
    expected = lm.chat(MESSAGES, max_new_tokens=24)
    tokens = lm.generate(lm.encode(lm.apply_chat_template(MESSAGES)), 24)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY)
    assert [m.id for m in client.models.list()] == ["chat"]
    stream = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    assert len([p for p in pieces if p]) > 1  # streamed, not one block
    assert "".join(pieces) == expected and expected
    assert usage.prompt_tokens == len(lm.encode(lm.apply_chat_template(MESSAGES))) and usage.completion_tokens == len(tokens)
    assert finish == ("stop" if tokens[-1] in lm.eos_ids else "length")

    reply = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=24, temperature=0)
    assert reply.choices[0].message.content == expected
    words = expected.split()
    cut = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=24, temperature=0, stop=[words[3]])
    assert cut.choices[0].message.content == expected[: expected.index(words[3])] and cut.choices[0].finish_reason == "stop"

    prompt = lm.encode("w11 w12 w13")
    text = client.completions.create(model="chat", prompt="w11 w12 w13", max_tokens=8, temperature=0).choices[0].text
    by_ids = client.completions.create(model="chat", prompt=prompt, max_tokens=8, temperature=0).choices[0].text
    assert text == by_ids == lm.decode([t for t in lm.generate(prompt, 8) if t not in lm.eos_ids])
    sampled = [client.completions.create(model="chat", prompt=prompt, max_tokens=8, temperature=1.0, seed=3).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1] == lm.decode([t for t in lm.generate(prompt, 8, temperature=1.0, seed=3) if t not in lm.eos_ids])


def test_mistakes_get_the_protocol_status_and_the_server_keeps_serving(server, kws_pkg):
    url, x = server.url, rt.load(kws_pkg).example_inputs()["features"]

    def infer(name="kws", shape=None, datatype="FP32", data=None, headers=AUTH, content=None):
        body = {"inputs": [{"name": "features", "shape": shape or list(x.shape), "datatype": datatype,
                            "data": x.ravel().tolist() if data is None else data}]}
        return httpx.post(f"{url}/v2/models/{name}/infer", headers=headers, timeout=60,
                          **({"content": content} if content is not None else {"json": body}))

    cases = [
        (infer("nope"), 404, "unknown model 'nope'"),
        (infer(shape=[1, 49, 40]), 400, "has shape [1, 49, 40], the model expects [1, 1, 49, 40]"),
        (infer(datatype="INT64", data=x.astype(np.int64).ravel().tolist()), 400, "is INT64, the model expects FP32"),
        (infer(data=[1.0, 2.0]), 400, "2 values for shape"),
        (infer(content=b'{"inputs": [}'), 400, "not valid JSON"),
        (infer(headers={}), 401, "needs an API key"),
        (infer(headers={"Authorization": "Bearer wrong"}), 401, "wrong API key"),
        (httpx.post(f"{url}/v1/chat/completions", headers=AUTH, content=b"{nope"), 400, "not valid JSON"),
        (httpx.post(f"{url}/v1/chat/completions", headers=AUTH, json={"model": "chat", "messages": MESSAGES, "temperature": -1}), 400,
         "'temperature' must be at least 0"),
        (httpx.post(f"{url}/v1/completions", headers=AUTH, json={"model": "chat", "prompt": [300]}), 400, "outside the vocabulary"),
    ]
    for response, status, message in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert message in (error["message"] if isinstance(error, dict) else error)  # /v1: OpenAI's error object
        ok(server, kws_pkg)

    # a body over the cap (1 MB here) is refused by its Content-Length, before any of it is read
    host, port = urlparse(url).hostname, urlparse(url).port
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(f"POST /v2/models/kws/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {2 << 20}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split()[1] == b"413" and "more than this server takes" in json.loads(body)["error"]
    ok(server, kws_pkg)


def test_concurrent_clients_get_their_own_answers(server, kws_pkg, chat_pkg):
    """Tensor requests in parallel with two streaming chats (which queue on the model's lock): each gets what it
    would have alone."""
    import openai

    model, lm = rt.load(kws_pkg), rt.load(chat_pkg)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(model.inputs[0].shape).astype(np.float32) for _ in range(6)]
    expected = [model.run(features=x)["logits"] for x in xs]
    chats = [[{"role": "user", "content": f"w{20 + i} w{30 + i}"}] for i in range(2)]
    expected_chat = [lm.chat(m, max_new_tokens=16) for m in chats]
    got, errors = {}, []

    def tensors(i):
        try:
            th, client = triton(server)
            for _ in range(3):
                got[i] = client.infer("kws", triton_inputs(th, model, {"features": xs[i]}), headers=dict(AUTH)).as_numpy("logits")
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    def chat(i):
        try:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY)
            stream = client.chat.completions.create(model="chat", messages=chats[i], max_tokens=16, temperature=0, stream=True)
            got[f"chat{i}"] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=tensors, args=(i,)) for i in range(len(xs))] + [threading.Thread(target=chat, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, e in enumerate(expected):
        np.testing.assert_allclose(got[i], e, rtol=0, atol=1e-6)
    assert [got["chat0"], got["chat1"]] == expected_chat


def test_a_client_that_goes_away_stops_its_generation(chat_pkg):
    """Cancelling a generation (what a dropped stream does) stops it within the few pieces it may run ahead of its
    reader, in its own thread, which releases the model's lock; over HTTP, a dropped stream leaves the server serving."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import uvicorn

    from edgellm.serve.app import Served, bind, create_app, url_of
    from edgellm.serve.openai_api import Generation

    lm = rt.load(chat_pkg)
    prompt = lm.encode("w40 w41")
    n = len(lm.generate(prompt, 400))  # greedy runs this far before EOS (or 400)
    assert n > 4 * Generation.AHEAD

    async def take_one_then_cancel(worker):
        generation = Generation(worker, lm, lambda: prompt, n, [], {"temperature": 0.0})
        assert await generation.next()
        generation.cancel()

    with ThreadPoolExecutor(1) as worker:
        asyncio.run(take_one_then_cancel(worker))
    assert lm._lock.acquire(timeout=120)  # the generation thread let go of the model
    lm._lock.release()
    assert len(prompt) < len(lm._cached) < len(prompt) + 2 * Generation.AHEAD

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app({"chat": Served("chat", chat_pkg, lm, True)}), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    request = {"model": "chat", "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True}
    try:
        with httpx.Client(base_url=url_of(sock), timeout=60) as client:
            with client.stream("POST", "/v1/completions", json=request) as r:
                assert next(line for line in r.iter_lines() if line.startswith("data:"))
            assert lm._lock.acquire(timeout=120)
            lm._lock.release()
            again = client.post("/v1/completions", json={**request, "stream": False, "max_tokens": 8}).json()
            assert again["choices"][0]["text"] == lm.decode(lm.generate(prompt, 8))
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_command_line_mistakes_are_one_line(server, kws_pkg, tmp_path):
    proc = run_cli("serve", str(tmp_path / "missing.edgepkg"), "--port", "0")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr
    port = urlparse(server.url).port
    proc = run_cli("serve", str(kws_pkg), "--port", str(port))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and f"port {port} on 127.0.0.1 is in use" in proc.stderr
    proc = run_cli("serve", f"a={kws_pkg}", f"a={kws_pkg}", "--port", "0")
    assert proc.returncode == 2 and "two packages would be served as 'a'" in proc.stderr


def test_device_side_server_runs_without_the_compiler_side(kws_pkg):
    """``python -m edgellm.serve`` where torch, onnx, rich and TVM's compiler cannot be imported (click can: uvicorn
    imports it, for its own command line)."""
    script = import_blocker("torch", "onnx", "onnxruntime", "rich", "transformers", "tvm.relax", "tvm.s_tir", "tvm.script.parser",
                            "edgellm.api", "edgellm.backends", "edgellm.llm", "edgellm.cli") + (
        "import runpy\nsys.argv = ['edgellm.serve'] + sys.argv[1:]\nrunpy.run_module('edgellm.serve', run_name='__main__')\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(kws_pkg), "--port", "0", "--json", "--threads", "1"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    server = Server.__new__(Server)
    server.proc = proc
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.poll() is not None else "no startup line"
        server.url = json.loads(line)["url"]
        model = rt.load(kws_pkg)
        x = model.example_inputs()["features"]
        r = httpx.post(f"{server.url}/v2/models/{kws_pkg.stem}/infer", timeout=60,
                       json={"inputs": [{"name": "features", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["outputs"][0]["data"], model.run(features=x)["logits"].ravel(), rtol=0, atol=1e-6)
    finally:
        assert "Traceback" not in server.stop()
    assert proc.returncode == 0
