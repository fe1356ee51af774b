"""What crosses between processes when API pods and worker pods are apart: jobs, results and errors.

Everything is plain JSON. Dataclasses are written generically, field by field (bytes as base64, tuples
tagged so they come back as tuples), so whatever ``GenerationParams`` holds today or gains tomorrow
travels without a codec change. Only the dataclasses named in ``_TYPES`` (those of server/params.py and the
job results) are rebuilt on the way in: a payload can never name an arbitrary class to construct.

Both Redis sides use it: the API encodes jobs and decodes replies, the worker the other way round.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from typing import Any

from .. import params as job_params
from ..errors import DarkroomError
from ..jobs import GeneratedImage, Job, JobResult

# Bumped when the envelope changes incompatibly; a worker refuses (fails) jobs of another version.
WIRE_VERSION = 1


def _dataclasses_of(module: Any) -> dict[str, type]:
    return {
        name: obj for name, obj in vars(module).items()
        if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__
    }


_TYPES: dict[str, type] = {**_dataclasses_of(job_params), "JobResult": JobResult,
                           "GeneratedImage": GeneratedImage}


def encode_value(value: Any) -> Any:
    """A JSON-able form of ``value``: known dataclasses, bytes, tuples, lists, dicts, scalars."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"__b64__": base64.b64encode(bytes(value)).decode("ascii")}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = type(value).__name__
        if _TYPES.get(name) is not type(value):
            raise TypeError(f"{name} is not a type that may cross processes")
        fields = {f.name: encode_value(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"__dc__": name, "fields": fields}
    if isinstance(value, tuple):
        return {"__tuple__": [encode_value(v) for v in value]}
    if isinstance(value, list):
        return [encode_value(v) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("only dicts with string keys may cross processes")
        if any(k.startswith("__") for k in value):
            raise TypeError("dict keys starting with '__' are reserved by the wire format")
        return {k: encode_value(v) for k, v in value.items()}
    raise TypeError(f"cannot send a {type(value).__name__} to another process")


def decode_value(value: Any) -> Any:
    if isinstance(value, list):
        return [decode_value(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__b64__" in value:
        return base64.b64decode(value["__b64__"])
    if "__tuple__" in value:
        return tuple(decode_value(v) for v in value["__tuple__"])
    if "__dc__" in value:
        cls = _TYPES.get(value["__dc__"])
        if cls is None:
            raise ValueError(f"unknown type {value['__dc__']!r} in a job payload")
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        fields = {k: decode_value(v) for k, v in value["fields"].items()}
        unknown = set(fields) - known
        if unknown:
            raise ValueError(f"{cls.__name__} has no fields {sorted(unknown)} (mixed versions?)")
        return cls(**fields)
    return {k: decode_value(v) for k, v in value.items()}


# -- errors -------------------------------------------------------------------------------------------


class RemoteError(DarkroomError):
    """An error raised in another process, answered with the status and fields it was raised with."""

    def __init__(self, message: str, *, status: int, type: str, code: str | None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, param=param, headers=headers)
        self.status = status
        self.type = type
        self.code = code


def encode_error(error: BaseException) -> dict[str, Any]:
    if isinstance(error, DarkroomError):
        return {"message": error.message, "status": error.status, "type": error.type, "code": error.code,
                "param": error.param, "headers": dict(error.headers)}
    return {"message": "image generation failed; see the worker log", "status": 500, "type": "server_error",
            "code": "internal_error", "param": None, "headers": {}}


def decode_error(data: dict[str, Any]) -> RemoteError:
    return RemoteError(data["message"], status=int(data["status"]), type=data["type"], code=data.get("code"),
                       param=data.get("param"), headers=data.get("headers") or {})


# -- jobs and replies ---------------------------------------------------------------------------------


def encode_job(job: Job, reply_to: str) -> str:
    """The stream entry for a job: its params, and its deadline and arrival as absolute unix times."""
    now_mono, now_unix = time.monotonic(), time.time()
    return json.dumps({
        "v": WIRE_VERSION,
        "id": job.id,
        "params": encode_value(job.params),
        "deadline": now_unix + (job.deadline - now_mono),
        "enqueued": now_unix - (now_mono - job.enqueued_at),
        "created": job.created_unix,
        "reply_to": reply_to,
        "request_id": job.request_id,
    }, separators=(",", ":"))


@dataclasses.dataclass(frozen=True)
class JobEnvelope:
    id: str
    params: Any
    deadline_unix: float
    enqueued_unix: float
    created_unix: int
    reply_to: str
    request_id: str | None = None


def decode_job(payload: str | bytes) -> JobEnvelope:
    data = json.loads(payload)
    if data.get("v") != WIRE_VERSION:
        raise ValueError(f"job payload version {data.get('v')!r}, this worker reads {WIRE_VERSION}")
    params = decode_value(data["params"])
    if not isinstance(params, job_params.GenerationParams):
        raise ValueError("a job payload must hold GenerationParams")
    return JobEnvelope(str(data["id"]), params, float(data["deadline"]), float(data["enqueued"]),
                       int(data["created"]), str(data["reply_to"]), data.get("request_id"))


def encode_reply(job_id: str, result: JobResult | None = None, error: BaseException | None = None) -> str:
    if result is not None:
        return json.dumps({"id": job_id, "ok": True, "result": encode_value(result)}, separators=(",", ":"))
    assert error is not None
    return json.dumps({"id": job_id, "ok": False, "error": encode_error(error)}, separators=(",", ":"))


def decode_reply(payload: str | bytes) -> tuple[str, JobResult | RemoteError]:
    data = json.loads(payload)
    if data["ok"]:
        result = decode_value(data["result"])
        if not isinstance(result, JobResult):
            raise ValueError("a reply must hold a JobResult")
        return data["id"], result
    return data["id"], decode_error(data["error"])
