"""Dump sglang's HTTP request schemas to tests/fixtures/sglang_schemas.json; check our payloads.

Run with an interpreter that has sglang (not the project venv: sglang pins torch==2.14.1): the
venv of the `sglang` test tier, which `tools/sglang_venv.sh` builds (or finds) and prints:

    PYTHONPATH=. "$(tools/sglang_venv.sh)/bin/python" tools/check_sglang_schemas.py \
        [--check-payloads]

Writes, per request class, every field's name, annotation, JSON type (a small grammar the unit
test understands: "int", "number", "bool", "str", "null", "object", "any", {"list": T},
{"anyOf": [...]}, {"enum": [...]}), default and whether it is required. `--check-payloads` also
feeds the payloads `rpg_megatron.rollout.sglang_protocol` builds through sglang's own validators:
the generated JSON contract of /generate (`sglang.api.v1.api_types`), the pydantic schema FastAPI
builds for the msgspec request structs, the server's and the router's argument parsers for our
command lines, and sglang's MultiprocessingSerializer.deserialize (its SafeUnpickler) on a bucket
serialised by our own `sglang_weights.per_rank_payloads`, through the base64 HTTP encoding.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import types
import typing
import warnings
from pathlib import Path

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "sglang_schemas.json"
IO_STRUCT = (
    "GenerateReqInput",
    "UpdateWeightsFromTensorReqInput",
    "InitWeightsUpdateGroupReqInput",
    "UpdateWeightsFromDistributedReqInput",
    "DestroyWeightsUpdateGroupReqInput",
    "UpdateWeightFromDiskReqInput",
    "BeginWeightUpdateReqInput",
    "EndWeightUpdateReqInput",
    "ReleaseMemoryOccupationReqInput",
    "ResumeMemoryOccupationReqInput",
)


def json_type(tp: object) -> object:
    """A typing annotation -> the JSON shape it accepts (see module docstring)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return json_type(args[0])
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [json_type(a) for a in args]}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (list, set, frozenset, tuple):
        return {"list": json_type(args[0]) if args else "any"}
    if origin is dict or tp is dict:
        return "object"
    simple = {type(None): "null", bool: "bool", int: "int", float: "number", str: "str"}
    if tp in simple:
        return simple[tp]
    if tp is bytes:
        return "str"  # base64 over HTTP (sglang.srt.utils.msgspec_utils.Base64Bytes)
    return "any" if tp is typing.Any else "object"


def _default(value: object) -> object:
    try:
        json.dumps(value)
    except TypeError:
        return repr(value)
    return value


def describe(cls: type) -> dict:
    """Fields of a dataclass or msgspec Struct: annotation, JSON type, default, required."""
    import msgspec

    hints = typing.get_type_hints(cls, include_extras=True)
    out = {}
    if dataclasses.is_dataclass(cls):
        for f in dataclasses.fields(cls):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            default = None if f.default is dataclasses.MISSING else _default(f.default)
            out[f.name] = (hints[f.name], required, default)
    else:
        for f in msgspec.structs.fields(cls):
            required = f.default is msgspec.NODEFAULT and f.default_factory is msgspec.NODEFAULT
            default = None if f.default is msgspec.NODEFAULT else _default(f.default)
            out[f.name] = (hints[f.name], required, default)
    return {
        name: {
            # No "at 0x..." addresses: the fixture must not change between runs.
            "annotation": re.sub(r" at 0x[0-9a-f]+", "", str(tp).replace("typing.", "")),
            "json": json_type(tp),
            "required": required,
            "default": default,
        }
        for name, (tp, required, default) in out.items()
    }


def dump() -> dict:
    import sglang
    from sglang.api.v1 import api_types
    from sglang.srt.managers import io_struct

    classes = {name: describe(getattr(io_struct, name)) for name in IO_STRUCT}
    # /generate's sampling_params is a free dict in GenerateReqInput; the generated contract
    # (which the server applies before the dataclass, and which rejects unknown keys) types it.
    classes["SamplingParams"] = describe(api_types.SamplingParams)
    return {"sglang_version": sglang.__version__, "classes": classes}


def check_payloads() -> None:
    """Validate our payloads with sglang's own validators; raises on the first mismatch."""
    import pydantic
    import torch
    from sglang.api.v1 import api_types
    from sglang.srt.managers import io_struct
    from sglang.srt.server_args import ServerArgs
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang_router.launch_router import parse_router_args

    from rpg_megatron.batch import SamplingParams
    from rpg_megatron.config import SGLangConfig
    from rpg_megatron.rollout import sglang_protocol as ours
    from rpg_megatron.rollout.sglang_weights import per_rank_payloads

    for params in (
        SamplingParams(max_new_tokens=8, temperature=0.7, top_p=0.9, top_k=20, seed=3),
        SamplingParams(stop=("</answer>",), stop_token_ids=(7,), ignore_eos=True),
        SamplingParams(temperature=0.0),
    ):
        body = ours.generate_payload([[1, 2, 3], [4]], params, 0, params.seed)
        api_types.GenerateRequest.from_json_value(json.loads(json.dumps(body)))
        sps = body["sampling_params"]  # one dict for the batch, or one per prompt (seeded)
        for sp in sps if isinstance(sps, list) else [sps]:
            api_types.SamplingParams.from_json_value(sp)  # unknown keys rejected here
        pydantic.TypeAdapter(io_struct.GenerateReqInput).validate_python(body)

    bucket = [("model.embed_tokens.weight", torch.randn(4, 3)), ("lm_head.weight", torch.ones(2))]
    blobs = per_rank_payloads(bucket, 2)
    body = ours.update_tensor_payload(blobs, 5, flush_cache=True)
    req = pydantic.TypeAdapter(io_struct.UpdateWeightsFromTensorReqInput).validate_python(
        json.loads(json.dumps(body))
    )
    back = MultiprocessingSerializer.deserialize(req.serialized_named_tensors[1])
    assert [n for n, _ in back] == [n for n, _ in bucket]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(back, bucket, strict=True))

    checks = {
        io_struct.InitWeightsUpdateGroupReqInput: ours.init_group_payload(
            "10.0.0.1", 29600, rank_offset=1, world_size=3, group_name="g", backend="gloo"
        ),
        io_struct.UpdateWeightsFromDistributedReqInput: ours.update_distributed_payload(
            bucket, 5, group_name="g", flush_cache=False
        ),
        io_struct.DestroyWeightsUpdateGroupReqInput: {"group_name": "g"},
        io_struct.UpdateWeightFromDiskReqInput: ours.update_disk_payload("/w", 5, flush_cache=True),
        io_struct.BeginWeightUpdateReqInput: ours.session_payload(),
        io_struct.EndWeightUpdateReqInput: ours.session_payload(),
        io_struct.ReleaseMemoryOccupationReqInput: ours.memory_payload(None),
        io_struct.ResumeMemoryOccupationReqInput: ours.memory_payload(["weights"]),
    }
    for cls, body in checks.items():
        pydantic.TypeAdapter(cls).validate_python(json.loads(json.dumps(body)))
    dtypes = checks[io_struct.UpdateWeightsFromDistributedReqInput]["dtypes"]
    assert all(isinstance(getattr(torch, d), torch.dtype) for d in dtypes), dtypes

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    for cfg in (
        SGLangConfig(model_path="/m", num_engines=2, tp_size=2, deterministic=True),
        SGLangConfig(model_path="/m", device="cpu", dtype="float32", max_total_tokens=4096),
    ):
        argv = ours.server_argv(cfg, 1, python=sys.executable)
        assert argv[1:3] == ["-m", "sglang.launch_server"], argv
        parser.parse_args(argv[3:])
    router = ours.router_argv(cfg, ["http://a:1", "http://b:2"], python="p", metrics_port=9)
    assert router[1:3] == ["-m", "sglang_router.launch_router"], router
    parse_router_args(router[3:])
    print("payloads: generate, update_weights_from_tensor (our serializer, sglang's "
          "deserializer), init/destroy_weights_update_group, update_weights_from_distributed, "
          "update_weights_from_disk, begin/end_weight_update, release/resume memory, "
          "launch_server and launch_router argv: all accepted by sglang's validators")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=FIXTURE)
    ap.add_argument("--check-payloads", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    data = dump()
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out} (sglang {data['sglang_version']}, {len(data['classes'])} classes)")
    if args.check_payloads:
        check_payloads()


if __name__ == "__main__":
    main()
