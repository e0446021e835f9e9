"""Dump sglang's HTTP request schemas to tests/fixtures/sglang_schemas.json; check our payloads.

Run with an interpreter that has sglang (not the project venv: sglang pins transformers). On a
CPU box, per shared/gpu/README.md "SGLang":

    python3.11 -m venv /tmp/sglang-venv
    /tmp/sglang-venv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/sglang-venv/bin/pip install --no-deps sglang==0.5.23
    /tmp/sglang-venv/bin/pip install numpy orjson msgspec pyzmq pydantic fastapi uvicorn pillow \
        tqdm IPython dill apache-tvm-ffi==0.1.11 sentencepiece compressed-tensors==0.18.0 \
        loguru gguf openai==2.8.0 sniffio partial_json_parser requests psutil aiohttp packaging \
        regex pybase64 setproctitle xxhash transformers==5.19.0 einops python-multipart \
        prometheus-client triton
    PYTHONPATH=. /tmp/sglang-venv/bin/python tools/check_sglang_schemas.py [--check-payloads]

(torch 2.13.0+cpu is not enough: torchvision's PyPI wheels need libtorch_cuda, and io_struct
imports torchvision through transformers.)

Writes, per request class, every field's name, annotation, JSON type (a small grammar the unit
test understands: "int", "number", "bool", "str", "null", "object", "any", {"list": T},
{"anyOf": [...]}, {"enum": [...]}), default and whether it is required. `--check-payloads` also
feeds the payloads `rpg_megatron.rollout.sglang_protocol` builds through sglang's own validators:
the generated JSON contract of /generate (`sglang.api.v1.api_types`), the pydantic schema FastAPI
builds for the msgspec request structs, the server's argparse parser for our launch command, and
a MultiprocessingSerializer round trip of a weight bucket through the base64 HTTP encoding.
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

    from rpg_megatron.batch import SamplingParams
    from rpg_megatron.config import SGLangConfig
    from rpg_megatron.rollout import sglang_protocol as ours

    for params in (
        SamplingParams(max_new_tokens=8, temperature=0.7, top_p=0.9, top_k=20, seed=3),
        SamplingParams(stop=("</answer>",), stop_token_ids=(7,), ignore_eos=True),
        SamplingParams(temperature=0.0),
    ):
        body = ours.generate_payload([[1, 2, 3], [4]], params, 0, params.seed)
        api_types.GenerateRequest.from_json_value(json.loads(json.dumps(body)))
        for sp in body["sampling_params"]:
            api_types.SamplingParams.from_json_value(sp)  # unknown keys rejected here
        pydantic.TypeAdapter(io_struct.GenerateReqInput).validate_python(body)

    bucket = [("model.embed_tokens.weight", torch.randn(4, 3)), ("lm_head.weight", torch.ones(2))]
    blob = MultiprocessingSerializer.serialize(bucket, output_str=True)
    body = ours.update_tensor_payload([blob, blob], 5, flush_cache=True)
    req = pydantic.TypeAdapter(io_struct.UpdateWeightsFromTensorReqInput).validate_python(
        json.loads(json.dumps(body))
    )
    back = MultiprocessingSerializer.deserialize(req.serialized_named_tensors[1])
    assert [n for n, _ in back] == [n for n, _ in bucket]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(back, bucket, strict=True))

    checks = {
        io_struct.InitWeightsUpdateGroupReqInput: ours.init_group_payload(
            "10.0.0.1", 29600, rank_offset=1, world_size=3, group_name="g"
        ),
        io_struct.UpdateWeightsFromDistributedReqInput: ours.update_distributed_payload(
            bucket, 5, group_name="g", flush_cache=False
        ),
        io_struct.ReleaseMemoryOccupationReqInput: {},
        io_struct.ResumeMemoryOccupationReqInput: {},
    }
    for cls, body in checks.items():
        pydantic.TypeAdapter(cls).validate_python(json.loads(json.dumps(body)))
    dtypes = checks[io_struct.UpdateWeightsFromDistributedReqInput]["dtypes"]
    assert all(isinstance(getattr(torch, d), torch.dtype) for d in dtypes), dtypes

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    cfg = SGLangConfig(model_path="/m", num_engines=2, tp_size=2, deterministic=True)
    argv = ours.server_argv(cfg, 1, python=sys.executable)
    assert argv[1:3] == ["-m", "sglang.launch_server"], argv
    parser.parse_args(argv[3:])
    print("payloads: generate, update_weights_from_tensor (serializer round trip), "
          "init_weights_update_group, update_weights_from_distributed, release/resume memory, "
          "launch_server argv: all accepted by sglang's validators")  # fmt: skip


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
