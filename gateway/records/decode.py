"""Decoding sampled calls into prediction records (runs on the record pipeline's worker thread).

- Open Inference Protocol (`inference.GRPCInferenceService/ModelInfer`): one record per row of
  the batch. The batch size is the first dimension the inputs share (the outputs' when the
  model answered; tensors.batch_rows); a `[1]` (or scalar) input is a parameter shared by
  every row; a tensor of any other row count is skipped. Only
  the tensors the mapping wants are decoded, and a tensor that cannot be decoded costs its own
  columns, not the call.
- Any other proto: a field mapping from the config, or a user function `module:function`.
- Streaming calls: one record per call, the request messages joined (see `decode`).

Every record id follows one rule: `<request id>[:<OIP request id>]:<n>`, `n` the record's index
within its call (0 for a call with one record); a user mapper may set its own. Every loss is
counted in `losses` by reason.
"""

from __future__ import annotations

import collections
import hashlib
import importlib
import json
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from exporters.records.base import MAX_PREDICTION_ID, PredictionRecord
from gateway.config import FieldMapping, PredictionRecordsConfig
from gateway.pb import grpc_predict_v2_pb2 as oip
from gateway.records.tensors import (
    DecodeProblem,
    batch_rows,
    decode_tensors,
    f32,
    oip_outputs,
)

if TYPE_CHECKING:
    from gateway.dataplane.call import CallRecord
    from gateway.dataplane.methods import MethodTable

OIP_INFER = "/inference.GRPCInferenceService/ModelInfer"
MAX_ROWS_PER_CALL = 10_000
"""Rows of one batched call that become records; the rest are dropped (and counted)."""
MAX_COLUMNS = 1_000
"""Columns of one tensor (or one repeated field) that become features."""
OK = grpc.StatusCode.OK

LOSS_REASONS = ("too_many_rows", "no_rows", "tensor_skipped", "payload_too_large")
"""Losses inside a call that still makes records (or a 0-row call): counted by `Decoder`."""


# -- custom protos -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CallInfo:
    """The facts of one call, handed to a user mapping function with the decoded messages."""

    application: str
    deployment: str
    replica: str
    method: str
    status_code: str
    details: str
    latency_ms: float
    timestamp: int
    request_id: str
    tags: dict[str, str | bool | int | float]
    """The tags the gateway puts on every record of this call."""


def _path_value(msg: Message, path: str) -> Any:
    cur: Any = msg
    fd: Any = None
    for part in path.split("."):
        if not isinstance(cur, Message):
            raise DecodeProblem(f"field path {path!r}: {part!r} is inside a non-message value")
        fd = cur.DESCRIPTOR.fields_by_name.get(part)
        if fd is None:
            raise DecodeProblem(f"field path {path!r}: {cur.DESCRIPTOR.full_name} has no field "
                                f"{part!r}")
        value = getattr(cur, part)
        enum = fd.enum_type if fd.type == FieldDescriptor.TYPE_ENUM else None
        if enum is not None:
            names = {v.number: v.name for v in enum.values}
            if isinstance(value, int):
                value = names.get(value, value)
            else:  # repeated
                value = [names.get(v, v) for v in value]
        cur = value
    if fd is not None and fd.type == FieldDescriptor.TYPE_FLOAT:
        # A proto `float` reads as a double with float32 noise: keep its exact FP32 value.
        cur = f32(cur) if isinstance(cur, float) else [f32(v) for v in cur]
    return cur


def _plain(value: Any) -> Any:
    if isinstance(value, Message):
        return json.dumps(MessageToDict(value, preserving_proto_field_name=True),
                          sort_keys=True)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _add_feature(out: dict[str, Any], name: str, value: Any) -> None:
    if isinstance(value, Mapping) or hasattr(value, "items"):
        out[name] = json.dumps({str(k): _plain(v) for k, v in value.items()}, sort_keys=True,
                               default=str)
    elif isinstance(value, str | bytes | bool | int | float | Message):
        out[name] = _plain(value)
    else:  # repeated
        items = [_plain(v) for v in list(value)[:MAX_COLUMNS]]
        if all(isinstance(v, str) for v in items):
            out[name] = items
        else:
            for i, v in enumerate(items):
                out[f"{name}_{i}"] = v


def _joined(values: list[Any]) -> Any:
    """The values of one field over a stream's messages, as one repeated value."""
    if len(values) == 1:
        return values[0]
    flat: list[Any] = []
    for v in values:
        if isinstance(v, str | bytes | bool | int | float | Message) or hasattr(v, "items"):
            flat.append(v)
        else:
            flat.extend(v)
    return flat


# -- per application ---------------------------------------------------------------------------


class Plan:
    """How one application's calls become records (rebuilt when its config changes)."""

    def __init__(self, app: str, cfg: PredictionRecordsConfig, exporters: list[str]) -> None:
        self.app = app
        self.cfg = cfg
        self.exporters = exporters
        self.mapper: Callable[..., Any] | None = None
        if cfg.mapper:
            module, _, attr = cfg.mapper.partition(":")
            fn = getattr(importlib.import_module(module), attr, None)
            if not callable(fn):
                raise ValueError(f"mapper {cfg.mapper!r} is not a callable")
            self.mapper = fn
        methods = cfg.methods
        if methods is None and self.mapper is None and cfg.field_mapping is None:
            methods = [OIP_INFER]
        self.methods = frozenset(methods) if methods is not None else None
        self.rate = cfg.sample_rate
        self.cap = cfg.max_payload_bytes
        self.model = cfg.model_name or app
        """The model name of every record and actual of this application: fixed by the
        config, so actuals join their predictions after a restart too."""
        self.by_model_id = cfg.multiplexed_model_id == "model_name"

    def model_of(self, model_id: str | None) -> str:
        """The model name of a call's record: its multiplexed model id when it had a valid
        one (and the config says so), else the application's model name."""
        if model_id and self.by_model_id and len(model_id) <= 256 and model_id.isprintable():
            return model_id
        return self.model

    def capture(self, path: str) -> bool:
        if self.methods is not None and path not in self.methods:
            return False
        return self.rate >= 1.0 or random.random() < self.rate


def prediction_id(base: str, n: int | None) -> str:
    """`<base>:<n>`; a base that would make it longer than 512 becomes its SHA-256."""
    pid = base if n is None else f"{base}:{n}"
    if len(pid) > MAX_PREDICTION_ID:
        digest = hashlib.sha256(base.encode()).hexdigest()
        pid = digest if n is None else f"{digest}:{n}"
    return pid


def call_tags(rec: CallRecord) -> dict[str, str | bool | int | float]:
    tags: dict[str, str | bool | int | float] = {
        "application": rec.application,
        "deployment": rec.deployment,
        "replica": rec.replica,
        "method": rec.method,
        "status_code": rec.code.name,
        "latency_ms": round(rec.latency_s * 1000.0, 3),
        "request_id": rec.request_id,
    }
    if rec.code is not OK and rec.details:
        tags["status_details"] = rec.details[:500]
    if rec.model_id:
        tags["multiplexed_model_id"] = rec.model_id[:256]
    return tags


MAX_CACHED_CLASSES = 4096
"""Message classes kept for decoding; past this the cache starts again (bounded memory)."""


class Decoder:
    """Turns one sampled call into records; counts partial losses in `losses`."""

    def __init__(self, methods: MethodTable | None = None) -> None:
        self.methods = methods
        self.losses: dict[str, int] = collections.defaultdict(int)
        self._classes: dict[str, type[Message]] = {}
        self.pools: list[Any] = [descriptor_pool.Default()]

    def set_pools(self, pools: Iterable[Any]) -> None:
        """Decode with the default pool (built-ins and proto_modules) then `pools` (the current
        config sources' and replicas'), in place of the ones before: a deploy that changes a
        message's definition is decoded with the new one, and the list does not grow with
        every deploy. Swapped whole, so the decode thread sees one list or the other."""
        new = [descriptor_pool.Default()]
        for pool in pools:
            if all(pool is not p for p in new):
                new.append(pool)
        if list(map(id, new)) != list(map(id, self.pools)):
            self.pools = new
            self._classes = {}

    def message_class(self, full_name: str) -> type[Message]:
        cls = self._classes.get(full_name)
        if cls is None:
            desc: Descriptor | None = None
            for pool in self.pools:
                try:
                    desc = pool.FindMessageTypeByName(full_name)
                    break
                except KeyError:
                    continue
            if desc is None:
                raise DecodeProblem(f"message type {full_name!r} is unknown (name its .proto in "
                                    "proto_files, or descriptor_sets, or proto_modules)")
            if len(self._classes) >= MAX_CACHED_CLASSES:
                self._classes = {}
            cls = self._classes[full_name] = message_factory.GetMessageClass(desc)
        return cls

    def decode(self, plan: Plan, rec: CallRecord, stream: tuple[list[bytes], list[bytes]]
               | None = None, note: str | None = None) -> list[PredictionRecord]:
        """Records of one call. `stream`: the request and response messages of a streaming
        call (one record per call: each mapped feature over all request messages, label and
        score from the last response). `note`: why the payload was not kept (then one record
        without features, tagged `payload_dropped`)."""
        if note is not None:
            tags = call_tags(rec)
            tags["payload_dropped"] = note
            return [self.record(plan, rec, tags=tags)]
        if plan.mapper is not None:
            return self._decode_user(plan, rec, stream)
        if stream is None and rec.method == OIP_INFER and (
                plan.cfg.field_mapping is None or plan.cfg.field_mapping.request_type is None):
            return self._decode_oip(plan, rec)
        if plan.cfg.field_mapping is not None:
            return self._decode_mapped(plan, rec, plan.cfg.field_mapping, stream)
        return []

    def _types(self, rec: CallRecord, mapping: FieldMapping | None) -> tuple[str, str]:
        info = self.methods.get(rec.method) if self.methods is not None else None
        req = mapping.request_type if mapping and mapping.request_type else None
        resp = mapping.response_type if mapping and mapping.response_type else None
        req = req or (info.input_type if info is not None else None)
        resp = resp or (info.output_type if info is not None else None)
        if req is None or resp is None:
            raise DecodeProblem(f"method {rec.method} is unknown: set field_mapping.request_type"
                                " and response_type, or name its .proto in proto_files (or "
                                "descriptor_sets, proto_modules)")
        return req, resp

    def record(self, plan: Plan, rec: CallRecord, n: int = 0, **kw: Any) -> PredictionRecord:
        kw.setdefault("prediction_id", prediction_id(rec.request_id, n))
        kw.setdefault("model_name", plan.model_of(rec.model_id))
        kw.setdefault("model_version", plan.cfg.model_version)
        kw.setdefault("prediction_timestamp", int(rec.start_time))
        kw.setdefault("tags", call_tags(rec))
        return PredictionRecord(model_type=plan.cfg.model_type,
                                environment=plan.cfg.environment,
                                application=plan.app, **kw)

    def _decode_oip(self, plan: Plan, rec: CallRecord) -> list[PredictionRecord]:
        assert rec.request is not None
        req = oip.ModelInferRequest.FromString(rec.request)
        resp = None
        if rec.code is OK and rec.response is not None:
            resp = oip.ModelInferResponse.FromString(rec.response)
        mapping = plan.cfg.field_mapping
        wanted = set(mapping.features) if mapping is not None and mapping.features else None
        out_wanted = None
        if mapping is not None and mapping.prediction_label and mapping.prediction_score:
            out_wanted = {mapping.prediction_label, mapping.prediction_score}
        columns = mapping.column_names if mapping is not None else {}
        skipped: list[str] = []
        inputs = decode_tensors(req.inputs, req.raw_input_contents,
                          lambda n: wanted is None or n in wanted, skipped)
        outputs = decode_tensors(resp.outputs, resp.raw_output_contents,
                           lambda n: out_wanted is None or n in out_wanted,
                           skipped) if resp is not None else []
        batch = batch_rows(inputs, outputs)
        if batch == 0:
            self.losses["no_rows"] += 1
            return []
        # Inputs of the batch's row count give per-row columns, [1] inputs are shared by every
        # row; any other row count cannot be lined up with the rows.
        usable = [t for t in inputs if t.rows in (batch, 1)]
        self.losses["tensor_skipped"] += len(skipped) + len(inputs) - len(usable)
        label_t, score_t = oip_outputs(outputs, mapping, batch)
        version = plan.cfg.model_version or req.model_version or (
            resp.model_version if resp is not None else "") or None
        base = f"{rec.request_id}:{req.id}" if req.id else rec.request_id
        ts = int(rec.start_time)
        rows = min(batch, MAX_ROWS_PER_CALL)
        if batch > rows:
            self.losses["too_many_rows"] += batch - rows
        tags = call_tags(rec)
        if req.id:
            tags["infer_id"] = req.id
        model = req.model_name or (resp.model_name if resp is not None else "")
        if model:
            tags["oip_model"] = model
        if skipped:
            tags["tensors_skipped"] = "; ".join(skipped)[:500]
        out = []
        for i in range(rows):
            feats: dict[str, Any] = {}
            for t in usable:
                vals = t.row(i)[:MAX_COLUMNS]
                names = columns.get(t.name)
                if t.per_row == 1 and not names:
                    feats[t.name] = vals[0]
                else:
                    for j, v in enumerate(vals):
                        feats[names[j] if names and j < len(names) else f"{t.name}_{j}"] = v
            label: Any = None
            score: float | None = None
            if label_t is not None:
                label = label_t.row(i)[0]
            if score_t is not None:
                nums = [float(v) for v in score_t.row(i)]
                best = max(range(len(nums)), key=nums.__getitem__)
                score = nums[best]
                if label is None and len(nums) > 1:
                    label = str(best)  # class probabilities: the label is the best class index
            row_tags = dict(tags)
            if batch > 1:
                row_tags["row"] = i
            out.append(self.record(
                plan, rec, prediction_id=prediction_id(base, i), model_version=version,
                prediction_timestamp=ts, prediction_label=label, prediction_score=score,
                features=feats, tags=row_tags,
            ))
        return out

    def _messages(self, type_name: str, raw: bytes | None,
                  stream: list[bytes] | None) -> list[Message]:
        cls = self.message_class(type_name)
        if stream is not None:
            return [cls.FromString(m) for m in stream]
        return [cls.FromString(raw)] if raw is not None else []

    def _decode_mapped(self, plan: Plan, rec: CallRecord, mapping: FieldMapping,
                       stream: tuple[list[bytes], list[bytes]] | None) -> list[PredictionRecord]:
        req_type, resp_type = self._types(rec, mapping)
        reqs = self._messages(req_type, rec.request, stream[0] if stream else None)
        feats: dict[str, Any] = {}
        if reqs:
            for path in mapping.features:
                _add_feature(feats, path, _joined([_path_value(m, path) for m in reqs]))
        label: Any = None
        score: float | None = None
        # A stream's answers before an error are real predictions; a failed unary call has none.
        resps = self._messages(resp_type, rec.response if rec.code is OK else None,
                               stream[1] if stream else None)
        if resps:
            last = resps[-1]  # a stream's final answer
            if mapping.prediction_label:
                label = _plain(_path_value(last, mapping.prediction_label))
            if mapping.prediction_score:
                score = float(_path_value(last, mapping.prediction_score))
        tags = call_tags(rec)
        if stream is not None:
            tags["request_messages"] = len(stream[0])
            tags["response_messages"] = len(stream[1])
        return [self.record(plan, rec, prediction_label=label, prediction_score=score,
                            features=feats, tags=tags)]

    def _decode_user(self, plan: Plan, rec: CallRecord,
                     stream: tuple[list[bytes], list[bytes]] | None) -> list[PredictionRecord]:
        assert plan.mapper is not None
        request: Any = stream[0] if stream is not None else rec.request
        response: Any = stream[1] if stream is not None else rec.response
        try:
            req_type, resp_type = self._types(rec, plan.cfg.field_mapping)
        except DecodeProblem:
            pass  # unknown method: the function gets the bytes
        else:
            reqs = self._messages(req_type, rec.request, stream[0] if stream else None)
            resps = self._messages(resp_type, rec.response, stream[1] if stream else None)
            request = reqs if stream is not None else reqs[0]
            if stream is not None:
                response = resps
            elif rec.response is not None and rec.code is OK:
                response = resps[0]
        tags = call_tags(rec)
        info = CallInfo(rec.application, rec.deployment, rec.replica, rec.method,
                        rec.code.name, rec.details, round(rec.latency_s * 1000.0, 3),
                        int(rec.start_time), rec.request_id, dict(tags))
        result = plan.mapper(request, response, info)
        if result is None:
            return []
        if isinstance(result, PredictionRecord | Mapping):
            result = [result]
        allowed = {f.name for f in fields(PredictionRecord)}
        out = []
        for n, item in enumerate(result):
            data = item.to_dict() if isinstance(item, PredictionRecord) else dict(item)
            data.pop("kind", None)
            unknown = set(data) - allowed
            if unknown:
                raise TypeError(f"record fields {sorted(unknown)} are unknown")
            data["tags"] = {**tags, **(data.get("tags") or {})}
            data = {k: v for k, v in data.items() if v is not None}
            for k in ("model_type", "environment", "application"):
                data.pop(k, None)
            if "prediction_timestamp" in data:
                data["prediction_timestamp"] = int(data["prediction_timestamp"])
            if data.get("prediction_id"):
                data["prediction_id"] = prediction_id(str(data["prediction_id"]), None)
            else:
                data.pop("prediction_id", None)
            out.append(self.record(plan, rec, n, **data))
        return out
