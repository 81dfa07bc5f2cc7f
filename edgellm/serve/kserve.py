"""The Open Inference Protocol (KServe v2), the HTTP API of Triton, OpenVINO Model Server and KServe.

Tensors travel as JSON (``"data": [...]``, row-major) or, with Triton's binary tensor data extension, as raw
little-endian bytes after the JSON header: the ``Inference-Header-Content-Length`` header says where the JSON
ends, each tensor's ``parameters.binary_data_size`` how many bytes follow for it, in order. ``tritonclient.http``
sends and asks for binary data by default. https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/
"""

from __future__ import annotations

import json

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edgellm.serve.common import HTTPError, Served, json_object, read_body

VERSION = "1"  # a package is one version of one model
HEADER = "inference-header-content-length"
DATATYPES = {"BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64", "INT8": "int8",
             "INT16": "int16", "INT32": "int32", "INT64": "int64", "FP16": "float16", "FP32": "float32", "FP64": "float64"}
KSERVE = {v: k for k, v in DATATYPES.items()}


def datatype(dtype: str) -> str:
    return KSERVE.get(str(np.dtype(dtype)), str(dtype).upper())


def tensor_metadata(specs) -> list[dict]:
    return [{"name": s.name, "datatype": datatype(s.dtype), "shape": list(s.shape)} for s in specs]


def decode_inputs(request: dict, binary: bytes, served: Served) -> dict[str, np.ndarray]:
    """The request's input tensors as arrays, checked against the model's names and datatypes (shapes: Model.run)."""
    specs = {s.name: s for s in served.model.inputs}
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not all(isinstance(i, dict) for i in inputs):
        raise HTTPError(400, "the request needs \"inputs\": a list of {\"name\", \"shape\", \"datatype\", \"data\"}")
    arrays, offset = {}, 0
    for item in inputs:
        name = item.get("name")
        if name not in specs:
            raise HTTPError(400, f"unknown input {name!r}: model {served.name!r} takes {', '.join(specs)}")
        spec, shape, kind = specs[name], item.get("shape"), item.get("datatype")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise HTTPError(400, f"input {name!r}: \"shape\" must be a list of non-negative integers, got {shape!r}")
        if kind != datatype(spec.dtype):
            raise HTTPError(400, f"input {name!r} is {kind}, the model expects {datatype(spec.dtype)} {list(spec.shape)}")
        dtype = np.dtype(DATATYPES[kind])
        count = int(np.prod(shape, dtype=np.int64))
        size = (item.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if size != count * dtype.itemsize or offset + size > len(binary):
                raise HTTPError(400, f"input {name!r}: binary_data_size {size} does not fit shape {shape} of {kind} "
                                     f"({count * dtype.itemsize} bytes) or the {len(binary) - offset} bytes left in the body")
            array = np.frombuffer(binary, dtype.newbyteorder("<"), count, offset).reshape(shape)
            offset += size
        else:
            try:
                array = np.asarray(item["data"], dtype)
            except KeyError:
                raise HTTPError(400, f"input {name!r} has neither \"data\" nor binary_data_size") from None
            except (ValueError, TypeError, OverflowError) as e:
                raise HTTPError(400, f"input {name!r}: its data are not {kind} values ({e})") from None
            if array.size != count:
                raise HTTPError(400, f"input {name!r}: {array.size} values for shape {shape}")
            array = array.reshape(shape)
        arrays[name] = array
    if offset != len(binary):
        raise HTTPError(400, f"{len(binary) - offset} bytes of binary data beyond what the inputs' binary_data_size take")
    return arrays


def infer(served: Served, body: bytes, header_length: str | None) -> Response:
    """One inference request, start to end (parse, run, encode): runs in a worker thread."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise HTTPError(400, f"Inference-Header-Content-Length {header_length!r} does not fit a body of {len(body)} bytes")
        head, binary = body[: int(header_length)], body[int(header_length):]
    else:
        head, binary = body, b""
    request = json_object(head, 'a JSON object with "inputs"')
    arrays = decode_inputs(request, binary, served)
    wanted = request.get("outputs")
    names = [s.name for s in served.model.outputs]
    binary_default = bool((request.get("parameters") or {}).get("binary_data_output", False))
    if wanted is None:
        wanted = [{"name": n} for n in names]
    elif not isinstance(wanted, list) or not all(isinstance(w, dict) and w.get("name") in names for w in wanted):
        raise HTTPError(400, f"\"outputs\" must name outputs of model {served.name!r}: {', '.join(names)}")
    results = served.run(arrays)  # InputError (shape, missing input) -> 400 by the app's handler
    outputs, blobs = [], []
    for w in wanted:
        array = np.ascontiguousarray(results[w["name"]])
        out = {"name": w["name"], "datatype": datatype(array.dtype), "shape": list(array.shape)}
        if (w.get("parameters") or {}).get("binary_data", binary_default):
            blob = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = array.ravel().tolist()
        outputs.append(out)
    reply = {"model_name": served.name, "model_version": VERSION, "outputs": outputs}
    if "id" in request:
        reply["id"] = request["id"]
    head = json.dumps(reply, separators=(",", ":")).encode()
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(b"".join([head, *blobs]), media_type="application/octet-stream", headers={"Inference-Header-Content-Length": str(len(head))})


def routes(models: dict[str, Served], max_body: int) -> list[Route]:
    from edgellm import __version__

    def tensor_model(request: Request) -> Served:
        name = request.path_params["name"]
        version = request.path_params.get("version", VERSION)
        if name not in models:
            raise HTTPError(404, f"unknown model {name!r}: this server has {', '.join(models)}")
        if models[name].is_lm:
            raise HTTPError(400, f"{name!r} is a language model: it is served at /v1/chat/completions and /v1/completions")
        if version != VERSION:
            raise HTTPError(404, f"model {name!r} has no version {version!r} (only {VERSION})")
        return models[name]

    async def live(request):
        return JSONResponse({"live": True})

    async def ready(request):
        return JSONResponse({"ready": True})  # packages load before the server listens

    async def server_metadata(request):
        return JSONResponse({"name": "edgellm", "version": __version__, "extensions": ["binary_tensor_data", "model_repository"]})

    async def model_metadata(request):
        s = tensor_model(request)
        return JSONResponse({"name": s.name, "versions": [VERSION], "platform": f"edgellm_{s.model.manifest['backend']['name']}",
                             "inputs": tensor_metadata(s.model.inputs), "outputs": tensor_metadata(s.model.outputs)})

    async def model_ready(request):
        tensor_model(request)
        return JSONResponse({"name": request.path_params["name"], "ready": True})

    async def repository_index(request):
        return JSONResponse([{"name": n, "version": VERSION, "state": "READY"} for n, s in models.items() if not s.is_lm])

    async def infer_route(request):
        served = tensor_model(request)
        body = await read_body(request, max_body)
        return await run_in_threadpool(infer, served, body, request.headers.get(HEADER))

    routes = [Route("/v2/health/live", live), Route("/v2/health/ready", ready), Route("/v2", server_metadata),
              Route("/v2/repository/index", repository_index, methods=["POST"])]
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        routes += [Route(prefix, model_metadata), Route(prefix + "/ready", model_ready), Route(prefix + "/infer", infer_route, methods=["POST"])]
    return routes
