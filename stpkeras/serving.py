"""Serving stage: clients for TF Serving's REST and gRPC predict APIs.

    http://HOST:8501/v1/models/NAME[/versions/N]   REST  (POST .../NAME:predict, JSON)
    grpc://HOST:8500/NAME[/versions/N]             gRPC  (tensorflow.serving.PredictionService/Predict)

Both clients send a batch in as many requests as it takes to keep each
request under `max_request_bytes`, join the answers, retry what can succeed
on a second try (connection refused or reset, 502/503/504, gRPC UNAVAILABLE
and DEADLINE_EXCEEDED) with exponential back-off, and turn everything else
into a `ServingError` subclass whose message names the server, the model, what
was sent and what the server said. String outputs come back as `str` in both.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import random
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from stpkeras.signatures import PATCHES, SERVING_DEFAULT
from tfrecords_tools.errors import BadInput, NotNow

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF_S = 0.5
MAX_BACKOFF_S = 8.0
# 4 MiB is gRPC's default message limit, the one most proxies in front of a server keep.
DEFAULT_MAX_REQUEST_MB = 4.0


class ServingError(NotNow):
    """A request that failed; `str()` names the server and the reason."""


class ServerUnavailable(ServingError):
    """Nothing answered (refused, reset, 503) after every retry."""


class ServingTimeout(ServingError):
    """The server did not answer within the timeout, after every retry."""


class ModelNotFound(BadInput, ServingError):
    """The server runs but does not serve this model (or version)."""


class BadRequest(BadInput, ServingError):
    """The server refused the input: wrong signature, dtype or shape."""


class RequestTooLarge(BadInput, ServingError):
    """A single item is larger than the request size limit, so no split can help."""


@dataclasses.dataclass(frozen=True)
class ServerAddress:
    """A parsed `--server` URL."""

    scheme: str            # "http", "https" or "grpc"
    host: str
    port: int
    model: str
    version: Optional[int] = None

    @classmethod
    def parse(cls, url: str) -> "ServerAddress":
        p = urllib.parse.urlsplit(url)
        if p.scheme in ("http", "https"):
            m = re.fullmatch(r"/v1/models/([^/:]+)(?:/versions/(\d+))?/?", p.path)
            default_port = 8501
        elif p.scheme == "grpc":
            m = re.fullmatch(r"/([^/:]+)(?:/versions/(\d+))?/?", p.path)
            default_port = 8500
        else:
            m = None
        if m is None or not p.hostname:
            raise ValueError(f"Invalid server URL {url!r}. Expected http://HOST:8501/v1/models/NAME "
                             "(TF Serving's REST API) or grpc://HOST:8500/NAME (its gRPC API), "
                             "each optionally followed by /versions/N")
        return cls(p.scheme, p.hostname, p.port or default_port, m.group(1),
                   int(m.group(2)) if m.group(2) else None)

    @property
    def model_url(self) -> str:
        base = f"{self.scheme}://{self.host}:{self.port}/v1/models/{self.model}"
        return base + (f"/versions/{self.version}" if self.version is not None else "")

    def __str__(self) -> str:
        if self.scheme == "grpc":
            return f"grpc://{self.host}:{self.port}/{self.model}" + (
                f"/versions/{self.version}" if self.version is not None else "")
        return self.model_url


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    timeout_s: float = DEFAULT_TIMEOUT_S     # per request
    retries: int = DEFAULT_RETRIES           # further tries after the first
    backoff_s: float = DEFAULT_BACKOFF_S     # wait before the first retry; doubles each time
    max_backoff_s: float = MAX_BACKOFF_S

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise ValueError(f"Invalid value for argument `timeout_s`. Expected a positive number. "
                             f"Received timeout_s={self.timeout_s!r}")
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"Invalid value for argument `retries`. Expected an integer >= 0. "
                             f"Received retries={self.retries!r}")

    def delay(self, attempt: int) -> float:
        # Jitter spreads the retries of many clients that failed together.
        return min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * random.uniform(0.5, 1.0)


class _Retryable(Exception):
    def __init__(self, error: ServingError):
        super().__init__(str(error))
        self.error = error


def _with_retries(policy: RetryPolicy, call: Callable[[], object], sleep: Callable[[float], None] = time.sleep):
    for attempt in range(policy.retries + 1):
        try:
            return call()
        except _Retryable as r:
            if attempt == policy.retries:
                error = r.error
                raise type(error)(f"{error} (gave up after {policy.retries + 1} tries)") from None
            sleep(policy.delay(attempt))
    raise AssertionError("unreachable")  # pragma: no cover


def split_batches(sizes: Sequence[int], limit: int, what: str = "item") -> List[Tuple[int, int]]:
    """Consecutive ranges `[start, stop)` of items whose summed sizes stay within `limit` bytes."""
    ranges, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if size > limit:
            raise RequestTooLarge(f"one {what} takes {size / 2**20:.2f} MiB in a request, above the limit of "
                                  f"{limit / 2**20:.2f} MiB (--max-request-mb); raise the limit")
        if i > start and total + size > limit:
            ranges.append((start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        ranges.append((start, len(sizes)))
    return ranges


_UINT8_TEXT = np.array([str(i).encode() for i in range(256)], dtype=object)


def json_uint8(array: np.ndarray) -> bytes:
    """A uint8 array as a nested JSON list, e.g. `[[1,2],[3,4]]`, without a Python object per value.

    `json.dumps(array.tolist())` makes a Python list per row and an int per value;
    with TensorFlow loaded, the garbage collector's full passes over that many new
    objects cost hundreds of milliseconds now and then (seen as a p99 of ~300 ms
    for one 8x32x32 patch). Here every token is one of 256 prebuilt byte strings
    or one of `ndim + 1` separators, picked by numpy indexing.
    """
    array = np.asarray(array)
    if array.ndim == 0:
        return _UINT8_TEXT[int(array)]
    if array.size == 0:
        return json.dumps(array.tolist()).encode()
    flat = array.reshape(-1)
    n, ndim = flat.size, array.ndim
    # Between values i-1 and i, `r` lists close and reopen: as many as trailing dimensions that roll over.
    index = np.arange(1, n)
    r = np.zeros(n - 1, np.intp)
    stride = 1
    for size in array.shape[:0:-1]:
        stride *= size
        r += (index % stride == 0)
    separators = np.array([b"]" * k + b"," + b"[" * k for k in range(ndim)], dtype=object)
    tokens = np.empty(2 * n - 1, dtype=object)
    tokens[0::2] = _UINT8_TEXT[flat]
    tokens[1::2] = separators[r]
    return b"[" * ndim + b"".join(tokens) + b"]" * ndim


def _describe(inputs: Dict[str, np.ndarray]) -> str:
    return ", ".join(f"{k}: {v.dtype} {list(v.shape)}" for k, v in inputs.items())


def _as_str(values: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda b: b.decode("utf-8", "replace") if isinstance(b, bytes) else str(b),
                        otypes=[object])(values)


def _join(parts: List[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


class _Client:
    """What the REST and gRPC clients share: the address, retries and request splitting."""

    def __init__(self, url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES,
                 backoff_s: float = DEFAULT_BACKOFF_S, max_request_mb: float = DEFAULT_MAX_REQUEST_MB):
        self.address = ServerAddress.parse(url)
        self.policy = RetryPolicy(timeout_s, retries, backoff_s)
        if not max_request_mb > 0:
            raise ValueError(f"Invalid value for argument `max_request_mb`. Expected a positive number. "
                             f"Received max_request_mb={max_request_mb!r}")
        self.max_request_bytes = int(max_request_mb * 2**20)
        self.requests = 0  # requests sent (after splitting), for summaries and tests

    def predict(self, inputs: Dict[str, np.ndarray], signature: str = SERVING_DEFAULT) -> Dict[str, np.ndarray]:
        """Runs `signature` on a batch (`{input key: array [batch, ...]}`), split into requests as needed."""
        inputs = {k: np.asarray(v) for k, v in inputs.items()}
        lengths = {len(v) for v in inputs.values()}
        if len(lengths) != 1:
            raise ValueError(f"inputs differ in batch size: {_describe(inputs)}")
        if not lengths.pop():
            raise ValueError("empty batch: nothing to send")
        encoded, sizes = self._encode(inputs)
        ranges = split_batches(sizes, self.max_request_bytes - self._overhead, self._item_what)
        return _join([self._send(inputs, encoded, start, stop, signature) for start, stop in ranges])

    def __call__(self, patches: np.ndarray) -> Dict[str, np.ndarray]:
        return self.predict({PATCHES: patches})

    # Subclasses: `_encode` returns what `_send` needs and each item's size in a request;
    # `_send` sends items [start, stop) and returns the outputs as numpy arrays.
    _overhead = 1024
    _item_what = "item"

    def _encode(self, inputs: Dict[str, np.ndarray]) -> Tuple[object, List[int]]:
        raise NotImplementedError

    def _send(self, inputs, encoded, start: int, stop: int, signature: str) -> Dict[str, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RestClient(_Client):
    """TF Serving's REST predict API (columnar `inputs` -> `outputs` JSON)."""

    def __init__(self, url: str, **kwargs):
        super().__init__(url, **kwargs)
        if self.address.scheme not in ("http", "https"):
            raise ValueError(f"Invalid REST URL {url!r}. Expected http://HOST:PORT/v1/models/NAME")
        self._signature_outputs: Dict[str, List[str]] = {}

    # JSON is built once per item: its size decides the split, its bytes are what is sent.
    @staticmethod
    def _json_item(item) -> bytes:
        item = np.asarray(item, dtype=object) if isinstance(item, (bytes, str)) else item
        if item.dtype == np.uint8:
            return json_uint8(item)
        if item.dtype == object or item.dtype.kind in "SU":
            def enc(v):
                v = v.encode() if isinstance(v, str) else bytes(v)
                return {"b64": base64.b64encode(v).decode("ascii")}
            return json.dumps(np.vectorize(enc, otypes=[object])(item).tolist()
                              if item.ndim else enc(item.item())).encode()
        return json.dumps(item.tolist()).encode()

    _item_what = "item as JSON"

    def _encode(self, inputs):
        batch = len(next(iter(inputs.values())))
        rows = {k: [self._json_item(v[i]) for i in range(batch)] for k, v in inputs.items()}
        return rows, [sum(len(rows[k][i]) + 1 for k in rows) for i in range(batch)]

    @staticmethod
    def _body(rows: Dict[str, List[bytes]], start: int, stop: int, signature: str) -> bytes:
        parts = [json.dumps(k).encode() + b": [" + b",".join(v[start:stop]) + b"]" for k, v in rows.items()]
        return (b'{"signature_name": ' + json.dumps(signature).encode() + b', "inputs": {'
                + b", ".join(parts) + b"}}")

    def _request(self, method: str, url: str, body: Optional[bytes], what: str) -> dict:
        def once():
            request = urllib.request.Request(url, data=body, method=method,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.policy.timeout_s) as response:
                    payload = response.read()
            except urllib.error.HTTPError as e:
                message = _server_message(e)
                text = f"{url}: {what} failed with HTTP {e.code}: {message}"
                if e.code == 404:
                    raise ModelNotFound(text) from None
                if e.code in (502, 503, 504, 429):
                    raise _Retryable(ServerUnavailable(text)) from None
                if e.code == 400:
                    raise BadRequest(text) from None
                raise ServingError(text) from None
            except (socket.timeout, TimeoutError) as e:
                raise _Retryable(ServingTimeout(f"{url}: no answer within {self.policy.timeout_s:g}s "
                                                f"({what}; --timeout)")) from e
            except urllib.error.URLError as e:
                reason = e.reason
                if isinstance(reason, (socket.timeout, TimeoutError)):
                    raise _Retryable(ServingTimeout(f"{url}: no answer within {self.policy.timeout_s:g}s "
                                                    f"({what}; --timeout)")) from e
                raise _Retryable(ServerUnavailable(f"{url}: cannot reach the server ({reason}). Is TF Serving "
                                                   f"running with --rest_api_port={self.address.port}?")) from e
            except (ConnectionError, http.client.HTTPException) as e:
                raise _Retryable(ServerUnavailable(f"{url}: the connection broke during {what} "
                                                   f"({type(e).__name__}: {e})")) from e
            try:
                return json.loads(payload)
            except json.JSONDecodeError as e:
                raise ServingError(f"{url}: the answer to {what} is not JSON ({e}): {payload[:200]!r}") from e

        self.requests += method == "POST"
        return _with_retries(self.policy, once)

    def status(self) -> dict:
        """`GET /v1/models/NAME`: the model's version states."""
        return self._request("GET", self.address.model_url, None, "model status")

    def metadata(self) -> dict:
        """`GET /v1/models/NAME/metadata`: the signature definitions."""
        return self._request("GET", self.address.model_url + "/metadata", None, "model metadata")

    def _output_keys(self, signature: str) -> List[str]:
        if signature not in self._signature_outputs:
            defs = self.metadata().get("metadata", {}).get("signature_def", {}).get("signature_def", {})
            if signature not in defs:
                raise BadRequest(f"{self.address}: the model has no signature {signature!r} "
                                 f"(it has {sorted(defs)})")
            self._signature_outputs[signature] = sorted(defs[signature].get("outputs", {}))
        return self._signature_outputs[signature]

    def _send(self, inputs, encoded, start, stop, signature):
        url = self.address.model_url + ":predict"
        chunk = {k: v[start:stop] for k, v in inputs.items()}
        answer = self._request("POST", url, self._body(encoded, start, stop, signature),
                               f"predict ({signature}; {_describe(chunk)})")
        if "outputs" not in answer:
            raise ServingError(f"{url}: the answer has no 'outputs' (keys: {sorted(answer)})")
        outputs = answer["outputs"]
        if not isinstance(outputs, dict):
            # TF Serving drops the name when a signature has a single output.
            keys = self._output_keys(signature)
            outputs = {keys[0]: outputs}
        return {k: _from_json(v) for k, v in outputs.items()}


def _from_json(value) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind in "U":
        return array.astype(object)
    if array.dtype == object:  # {"b64": ...} strings
        return np.vectorize(lambda v: base64.b64decode(v["b64"]).decode("utf-8", "replace")
                            if isinstance(v, dict) else v, otypes=[object])(array)
    if array.dtype.kind == "f":
        return array.astype(np.float32)
    return array


def _server_message(error: urllib.error.HTTPError) -> str:
    try:
        body = error.read()
    except Exception:  # a broken body must not hide the status code
        return error.reason or ""
    try:
        return json.loads(body).get("error", body.decode("utf-8", "replace"))
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        return body[:500].decode("utf-8", "replace")


class GrpcClient(_Client):
    """TF Serving's gRPC `PredictionService` (protos from `tensorflow-serving-api`)."""

    def __init__(self, url: str, **kwargs):
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        super().__init__(url, **kwargs)
        if self.address.scheme != "grpc":
            raise ValueError(f"Invalid gRPC URL {url!r}. Expected grpc://HOST:PORT/NAME")
        target = f"{self.address.host}:{self.address.port}"
        # Answers (logits, embeddings) may be large too; the request limit is ours to keep.
        self._channel = grpc.insecure_channel(target, options=[
            ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)])
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def _encode(self, inputs):
        batch = len(next(iter(inputs.values())))
        sizes = []
        for i in range(batch):
            size = 0
            for v in inputs.values():
                item = v[i]
                size += (sum(len(x) + 4 for x in np.ravel(item)) if v.dtype == object else item.nbytes) + 16
            sizes.append(size)
        return None, sizes

    def _model_spec(self, signature: str):
        from tensorflow_serving.apis import model_pb2

        spec = model_pb2.ModelSpec(name=self.address.model, signature_name=signature)
        if self.address.version is not None:
            spec.version.value = self.address.version
        return spec

    def _call(self, method, request, what: str):
        import grpc

        def once():
            try:
                return method(request, timeout=self.policy.timeout_s)
            except grpc.RpcError as e:
                code, details = e.code(), e.details()
                text = f"{self.address}: {what} failed with {code.name}: {details}"
                if code == grpc.StatusCode.UNAVAILABLE:
                    raise _Retryable(ServerUnavailable(
                        f"{self.address}: cannot reach the server ({details}). Is TF Serving running with "
                        f"--port={self.address.port}?")) from None
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise _Retryable(ServingTimeout(f"{self.address}: no answer within "
                                                    f"{self.policy.timeout_s:g}s ({what}; --timeout)")) from None
                if code == grpc.StatusCode.NOT_FOUND:
                    raise ModelNotFound(text) from None
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise BadRequest(text + " (lower --max-request-mb)") from None
                if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
                    raise BadRequest(text) from None
                raise ServingError(text) from None

        return _with_retries(self.policy, once)

    def _send(self, inputs, encoded, start, stop, signature):
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        chunk = {k: v[start:stop] for k, v in inputs.items()}
        request = predict_pb2.PredictRequest(model_spec=self._model_spec(signature))
        for k, v in chunk.items():
            request.inputs[k].CopyFrom(tf.make_tensor_proto(v))
        self.requests += 1
        response = self._call(self._stub.Predict, request, f"predict ({signature}; {_describe(chunk)})")
        out = {}
        for k, proto in response.outputs.items():
            value = tf.make_ndarray(proto)
            out[k] = _as_str(value) if value.dtype == object else value
        return out

    def metadata(self) -> dict:
        """`GetModelMetadata`: the signature definitions, as a dict shaped like the REST answer."""
        from google.protobuf import json_format
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest(model_spec=self._model_spec(""))
        request.metadata_field.append("signature_def")
        response = self._call(self._stub.GetModelMetadata, request, "model metadata")
        defs = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(defs)
        return {"model_spec": json_format.MessageToDict(response.model_spec, preserving_proto_field_name=True),
                "metadata": {"signature_def": json_format.MessageToDict(defs, preserving_proto_field_name=True)}}


def connect(url: str, **kwargs) -> _Client:
    """A REST or gRPC client for `url`, chosen by its scheme (see the module docstring)."""
    scheme = ServerAddress.parse(url).scheme
    return GrpcClient(url, **kwargs) if scheme == "grpc" else RestClient(url, **kwargs)
