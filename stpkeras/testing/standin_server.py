"""A TEST DOUBLE for TF Serving - not TF Serving.

It speaks a small part of TF Serving's two APIs, on 127.0.0.1 only, and
answers from the exported SavedModel loaded with `tf.saved_model.load`:

- REST: `GET /v1/models/NAME[/versions/N]` (status), `GET .../metadata`
  (signature defs) and `POST .../NAME[/versions/N]:predict` with the columnar
  (`inputs` -> `outputs`) and row (`instances` -> `predictions`) JSON formats.
- gRPC: `tensorflow.serving.PredictionService` `Predict` and
  `GetModelMetadata`, with the protos from `tensorflow-serving-api`.

Errors use TF Serving's status codes (404 / NOT_FOUND for an unknown model,
400 / INVALID_ARGUMENT for a bad input). It exists so the clients in
`stpkeras.serving` are tested against real sockets and real protos. It does
no batching, no version polling, no warmup and no model config; use TF
Serving (the `tensorflow/serving` image) to serve models.

    python -m stpkeras.testing.standin_server saved_models/NAME --rest-port 8501 --grpc-port 8500
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple

import numpy as np

from stpkeras.artifacts import resolve_saved_model, versions
from stpkeras.signatures import SERVING_DEFAULT
from tfrecords_tools.errors import BadInput

HOST = "127.0.0.1"
_REST_PATH = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+))?(/metadata|:predict)?$")


class StandInError(BadInput):
    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status  # "NOT_FOUND" or "INVALID_ARGUMENT"


class _Servable:
    """One loaded version: its signatures and their definitions from `saved_model.pb`."""

    def __init__(self, path: str):
        import tensorflow as tf
        from tensorflow.core.protobuf import saved_model_pb2

        self.path = path
        self.loaded = tf.saved_model.load(path, tags=["serve"])
        proto = saved_model_pb2.SavedModel()
        with open(os.path.join(path, "saved_model.pb"), "rb") as f:
            proto.ParseFromString(f.read())
        self.signature_defs = next(m for m in proto.meta_graphs if "serve" in m.meta_info_def.tags).signature_def

    def run(self, signature: str, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        import tensorflow as tf

        if signature not in self.loaded.signatures:
            raise StandInError("INVALID_ARGUMENT", f'Serving signature name: "{signature}" not found in signature def')
        fn = self.loaded.signatures[signature]
        specs = fn.structured_input_signature[1]
        if set(inputs) != set(specs):
            raise StandInError("INVALID_ARGUMENT", f"input keys {sorted(inputs)} do not match the signature's "
                                                   f"{sorted(specs)}")
        tensors = {}
        for key, spec in specs.items():
            value = inputs[key]
            if value.dtype != spec.dtype.as_numpy_dtype and not (value.dtype == object and spec.dtype == tf.string):
                raise StandInError("INVALID_ARGUMENT", f"Expects arg[0] ({key}) to be {spec.dtype.name} but "
                                                       f"{value.dtype} is provided")
            if not spec.shape.is_compatible_with(value.shape):
                raise StandInError("INVALID_ARGUMENT", f"input {key} has shape {list(value.shape)}, the signature "
                                                       f"expects {spec.shape}")
            tensors[key] = tf.constant(value, dtype=spec.dtype)
        try:
            outputs = fn(**tensors)
        except (tf.errors.InvalidArgumentError, ValueError, TypeError) as e:
            raise StandInError("INVALID_ARGUMENT", str(e).strip().splitlines()[0]) from e
        return {k: v.numpy() for k, v in outputs.items()}


class StandInServer:
    """Serves one model folder (`saved_models/NAME`, every integer version) or one SavedModel (as version 1).

    Start with `start()` (or `with`), which binds REST and gRPC on 127.0.0.1
    (port 0: a free one) and returns when both listen. `delay_s` delays every
    predict answer (to test client timeouts). `requests` records
    `(api, signature, batch size, request bytes)` per predict call.
    """

    def __init__(self, path: str, name: str, *, rest_port: int = 0, grpc_port: int = 0, delay_s: float = 0.0,
                 rest: bool = True, grpc: bool = True):
        self.name = name
        if versions(path):
            self.servables = {v: _Servable(os.path.join(path, str(v))) for v in versions(path)}
        else:
            self.servables = {1: _Servable(resolve_saved_model(path))}
        self.delay_s = delay_s
        self.requests: List[Tuple[str, str, int, int]] = []
        self._lock = threading.Lock()
        self._want = (rest_port if rest else None, grpc_port if grpc else None)
        self._http: Optional[ThreadingHTTPServer] = None
        self._grpc = None
        self.rest_port: Optional[int] = None
        self.grpc_port: Optional[int] = None

    @property
    def rest_url(self) -> str:
        return f"http://{HOST}:{self.rest_port}/v1/models/{self.name}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://{HOST}:{self.grpc_port}/{self.name}"

    def servable(self, name: str, version: Optional[int]) -> Tuple[int, _Servable]:
        if name != self.name:
            raise StandInError("NOT_FOUND", f"Servable not found for request: Latest({name})")
        if version is None:
            version = max(self.servables)
        if version not in self.servables:
            raise StandInError("NOT_FOUND", f"Servable not found for request: Specific({name}, {version})")
        return version, self.servables[version]

    def predict(self, api: str, name: str, version: Optional[int], signature: str,
                inputs: Dict[str, np.ndarray], size: int) -> Dict[str, np.ndarray]:
        _, servable = self.servable(name, version)
        batch = len(next(iter(inputs.values()))) if inputs else 0
        with self._lock:
            self.requests.append((api, signature, batch, size))
        if self.delay_s:
            time.sleep(self.delay_s)
        return servable.run(signature or SERVING_DEFAULT, inputs)

    # --- lifecycle ---

    def start(self) -> "StandInServer":
        rest_port, grpc_port = self._want
        if rest_port is not None:
            self._http = ThreadingHTTPServer((HOST, rest_port), _rest_handler(self))
            self._http.daemon_threads = True
            self.rest_port = self._http.server_address[1]
            threading.Thread(target=self._http.serve_forever, name="standin-rest", daemon=True).start()
        if grpc_port is not None:
            self._grpc, self.grpc_port = _start_grpc(self, grpc_port)
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._grpc is not None:
            self._grpc.stop(grace=None).wait()
            self._grpc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# --- REST ---------------------------------------------------------------------------------------


def _to_json(value: np.ndarray):
    if value.dtype == object:
        return np.vectorize(lambda b: b.decode("utf-8", "replace") if isinstance(b, bytes) else b,
                            otypes=[object])(value).tolist()
    return value.tolist()


def _from_json(value, dtype) -> np.ndarray:
    def unb64(v):
        return base64.b64decode(v["b64"]) if isinstance(v, dict) else (v.encode() if isinstance(v, str) else v)

    if dtype.name == "string":
        # Lists of strings or of {"b64": ...} objects, nested to the tensor's rank.
        def walk(v):
            return [walk(x) for x in v] if isinstance(v, list) else unb64(v)
        return np.array(walk(value), dtype=object)
    try:
        array = np.asarray(value)
    except ValueError as e:  # ragged lists
        raise StandInError("INVALID_ARGUMENT", f"JSON input is not a regular array: {e}") from e
    if array.dtype.kind not in "iufb":
        raise StandInError("INVALID_ARGUMENT", f"JSON input holds {array.dtype} values, expected numbers")
    target = dtype.as_numpy_dtype
    if array.dtype.kind == "f" and np.dtype(target).kind in "iu":
        raise StandInError("INVALID_ARGUMENT", f"JSON input holds floats for a {dtype.name} tensor")
    if np.dtype(target).kind in "iu" and array.size:
        info = np.iinfo(target)
        if array.min() < info.min or array.max() > info.max:
            raise StandInError("INVALID_ARGUMENT", f"JSON input values outside the range of {dtype.name}")
    return array.astype(target)


def _rest_handler(server: StandInServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet: tests read results, not access logs
            pass

        def setup(self):
            super().setup()
            # Headers and body leave in two writes; without this, Nagle's algorithm and the
            # client's delayed ACK hold the body back for tens of milliseconds.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def _answer(self, code: int, payload: dict):
            body = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _route(self):
            m = _REST_PATH.match(self.path)
            if not m:
                self._answer(404, {"error": f"Malformed request: {self.command} {self.path}"})
                return None
            return m.group(1), int(m.group(2)) if m.group(2) else None, m.group(3) or ""

        def do_GET(self):
            route = self._route()
            if route is None:
                return
            name, version, what = route
            try:
                version, servable = server.servable(name, version)
            except StandInError as e:
                self._answer(404, {"error": str(e)})
                return
            if what == "/metadata":
                from google.protobuf import json_format
                from tensorflow_serving.apis import get_model_metadata_pb2

                defs = get_model_metadata_pb2.SignatureDefMap()
                for k, v in servable.signature_defs.items():
                    defs.signature_def[k].CopyFrom(v)
                self._answer(200, {"model_spec": {"name": name, "signature_name": "", "version": str(version)},
                                   "metadata": {"signature_def": json_format.MessageToDict(
                                       defs, preserving_proto_field_name=True)}})
            elif what == "":
                self._answer(200, {"model_version_status": [
                    {"version": str(version), "state": "AVAILABLE",
                     "status": {"error_code": "OK", "error_message": ""}}]})
            else:
                self._answer(405, {"error": "predict takes POST"})

        def do_POST(self):
            length = int(self.headers.get("Content-Length", 0))
            raw = self.rfile.read(length)
            route = self._route()
            if route is None:
                return
            name, version, what = route
            if what != ":predict":
                self._answer(404, {"error": f"Malformed request: POST {self.path}"})
                return
            try:
                body = json.loads(raw)
                signature = body.get("signature_name", SERVING_DEFAULT) or SERVING_DEFAULT
                _, servable = server.servable(name, version)
                if signature not in servable.loaded.signatures:
                    raise StandInError("INVALID_ARGUMENT",
                                       f'Serving signature name: "{signature}" not found in signature def')
                specs = servable.loaded.signatures[signature].structured_input_signature[1]
                if "inputs" in body:
                    columns = body["inputs"]
                    if not isinstance(columns, dict):
                        if len(specs) != 1:
                            raise StandInError("INVALID_ARGUMENT", "unnamed inputs for a multi-input signature")
                        columns = {next(iter(specs)): columns}
                    row_format = False
                elif "instances" in body:
                    rows = body["instances"]
                    if rows and isinstance(rows[0], dict) and not set(rows[0]) <= {"b64"}:
                        columns = {k: [r[k] for r in rows] for k in rows[0]}
                    else:
                        columns = {next(iter(specs)): rows}
                    row_format = True
                else:
                    raise StandInError("INVALID_ARGUMENT", "Missing 'inputs' or 'instances' key")
                inputs = {}
                for k, v in columns.items():
                    if k not in specs:
                        raise StandInError("INVALID_ARGUMENT", f"input key {k!r} is not in the signature "
                                                               f"(it takes {sorted(specs)})")
                    inputs[k] = _from_json(v, specs[k].dtype)
                outputs = server.predict("rest", name, version, signature, inputs, len(raw))
            except json.JSONDecodeError as e:
                self._answer(400, {"error": f"JSON Parse error: {e}"})
                return
            except StandInError as e:
                self._answer(404 if e.status == "NOT_FOUND" else 400, {"error": str(e)})
                return
            if row_format:
                keys = sorted(outputs)
                n = len(next(iter(outputs.values())))
                if len(keys) == 1:
                    preds = _to_json(outputs[keys[0]])
                else:
                    preds = [{k: _to_json(outputs[k][i]) for k in keys} for i in range(n)]
                self._answer(200, {"predictions": preds})
            elif len(outputs) == 1:  # TF Serving drops the name of a single output
                self._answer(200, {"outputs": _to_json(next(iter(outputs.values())))})
            else:
                self._answer(200, {"outputs": {k: _to_json(v) for k, v in outputs.items()}})

    return Handler


# --- gRPC ---------------------------------------------------------------------------------------


def _start_grpc(server: StandInServer, port: int):
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import (get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc)

    status = {"NOT_FOUND": grpc.StatusCode.NOT_FOUND, "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT}

    class Service(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            spec = request.model_spec
            version = spec.version.value if spec.HasField("version") else None
            try:
                inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
                outputs = server.predict("grpc", spec.name, version, spec.signature_name or SERVING_DEFAULT,
                                         inputs, request.ByteSize())
            except StandInError as e:
                context.abort(status[e.status], str(e))
            except (TypeError, ValueError) as e:  # a tensor proto that does not parse
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad input tensor: {e}")
            response = predict_pb2.PredictResponse()
            response.model_spec.CopyFrom(spec)
            for k, v in outputs.items():
                response.outputs[k].CopyFrom(tf.make_tensor_proto(v))
            return response

        def GetModelMetadata(self, request, context):
            spec = request.model_spec
            version = spec.version.value if spec.HasField("version") else None
            try:
                version, servable = server.servable(spec.name, version)
            except StandInError as e:
                context.abort(status[e.status], str(e))
            defs = get_model_metadata_pb2.SignatureDefMap()
            for k, v in servable.signature_defs.items():
                defs.signature_def[k].CopyFrom(v)
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = spec.name
            response.model_spec.version.value = version
            response.metadata["signature_def"].Pack(defs)
            return response

    # TF Serving accepts messages up to 2 GiB; so does its stand-in.
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                              options=[("grpc.max_receive_message_length", 2**31 - 1),
                                       ("grpc.max_send_message_length", 2**31 - 1)])
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Service(), grpc_server)
    bound = grpc_server.add_insecure_port(f"{HOST}:{port}")
    if not bound:
        raise OSError(f"the stand-in could not listen on {HOST}:{port}")
    grpc_server.start()
    return grpc_server, bound


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="A TEST DOUBLE for TF Serving (not TF Serving), on 127.0.0.1.")
    parser.add_argument("path", help="saved_models/NAME or one SavedModel folder")
    parser.add_argument("--name", help="model name in URLs (default: the folder name)")
    parser.add_argument("--rest-port", type=int, default=8501)
    parser.add_argument("--grpc-port", type=int, default=8500)
    args = parser.parse_args(argv)
    name = args.name or os.path.basename(os.path.normpath(args.path))
    server = StandInServer(args.path, name, rest_port=args.rest_port, grpc_port=args.grpc_port).start()
    print(f"stand-in (test double, not TF Serving) serving {name}: {server.rest_url} {server.grpc_url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
