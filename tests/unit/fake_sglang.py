"""A fake SGLang 0.5.23 HTTP server for tests/unit/test_sglang_client.py: sglang's request
schemas (tests/fixtures/sglang_schemas.json, dumped from sglang itself) and its rules, each
citing the sglang file and line it comes from (FakeSGLang's docstring).

Standard library only at import, so the fake `python` of the launch tests runs this file
(runpy) in a fresh interpreter without torch.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

SCHEMAS = json.loads(
    (Path(__file__).resolve().parents[1] / "fixtures" / "sglang_schemas.json").read_text()
)["classes"]
BODY_CLASS = {
    "/generate": "GenerateReqInput",
    "/update_weights_from_tensor": "UpdateWeightsFromTensorReqInput",
    "/init_weights_update_group": "InitWeightsUpdateGroupReqInput",
    "/update_weights_from_distributed": "UpdateWeightsFromDistributedReqInput",
    "/destroy_weights_update_group": "DestroyWeightsUpdateGroupReqInput",
    "/update_weights_from_disk": "UpdateWeightFromDiskReqInput",
    "/begin_weight_update": "BeginWeightUpdateReqInput",
    "/end_weight_update": "EndWeightUpdateReqInput",
    "/release_memory_occupation": "ReleaseMemoryOccupationReqInput",
    "/resume_memory_occupation": "ResumeMemoryOccupationReqInput",
}
HF = {"vocab_size": 100, "model_type": "qwen3"}
ALL_TAGS = ["kv_cache", "weights", "cuda_graph"]  # srt/constants.py 6-9
# What a pickled list of (str, plain tensor) may reference, of the globals sglang's SafeUnpickler
# allows (srt/utils/common.py 3148-3359). torch's file-descriptor storages (rebuild_storage_fd,
# resource_sharer.DupFd) are allowed there too, but a separately launched server cannot fetch
# them (AuthenticationError, and on CPU the scheduler dies: shared/sglang-cpu/README.md), so the
# fake refuses them.
TENSOR_GLOBALS = {
    ("builtins", "list"),
    ("builtins", "tuple"),
    ("torch", "Tensor"),
    ("torch", "Size"),
    ("torch", "UntypedStorage"),
    ("torch.storage", "UntypedStorage"),
    ("torch.storage", "TypedStorage"),
    ("torch", "float32"),
    ("torch", "bfloat16"),
    ("torch", "float16"),
    ("torch", "int64"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch.multiprocessing.reductions", "rebuild_tensor"),
    ("torch.multiprocessing.reductions", "rebuild_storage_filename"),
    ("torch.multiprocessing.reductions", "rebuild_typed_storage"),
    ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"),
    ("collections", "OrderedDict"),
}


# ---------------------------------------------------------------------------------- schema
def _matches(value: object, shape: object) -> bool:
    """Whether a JSON value fits the fixture's type grammar."""
    if isinstance(shape, dict):
        if "anyOf" in shape:
            return any(_matches(value, s) for s in shape["anyOf"])
        if "enum" in shape:
            return value in shape["enum"]
        if "list" in shape:
            return isinstance(value, list) and all(_matches(v, shape["list"]) for v in value)
    checks = {
        "null": lambda v: v is None,
        "bool": lambda v: isinstance(v, bool),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "object": lambda v: isinstance(v, dict),
        "any": lambda v: True,
    }
    return checks[shape](value)


def schema_errors(body: dict, cls: str) -> list[str]:
    fields = SCHEMAS[cls]
    errors = [f"{cls}: unknown key {k!r}" for k in body if k not in fields]
    errors += [
        f"{cls}: required key {k!r} missing"
        for k, f in fields.items()
        if f["required"] and k not in body
    ]
    errors += [
        f"{cls}.{k}={body[k]!r} does not fit {fields[k]['annotation']}"
        for k in body
        if k in fields and not _matches(body[k], fields[k]["json"])
    ]
    if cls == "GenerateReqInput":
        sps = body.get("sampling_params") or []
        for sp in sps if isinstance(sps, list) else [sps]:
            errors += schema_errors(sp, "SamplingParams")
    return errors


# ---------------------------------------------------------------------------------- fake server
def expected_tokens(prompt: list[int], sp: dict) -> tuple[list[int], str]:
    """The fake server's completion rule and its finish type."""
    if prompt[0] == 99:
        return [], "abort"
    out: list[int] = []
    for k in range(sp["max_new_tokens"]):
        out.append((prompt[-1] + k + 1) % 100)
        if out[-1] in sp.get("stop_token_ids", []):
            return out, "stop"
    return out, "length"


class FakeSGLang:
    """ThreadingHTTPServer speaking sglang's native API; records every request.

    Rules, from sglang 0.5.23 (paths under sglang/srt/):
    S1 /update_weights_from_tensor and /update_weights_from_distributed outside a weight-update
       session answer success=false, HTTP 400 (managers/scheduler_components/weight_updater.py
       192-196, 234-238; entrypoints/http_server.py 1436-1456, 1488-1506).
    S2 /begin_weight_update while a session is open, /end_weight_update while none is: 400
       (weight_updater.py 309-316, 323-329; http_server.py 1458-1486).
    S3 /update_weights_from_disk needs no session (weight_updater.py 138-163).
    M1 /release_memory_occupation without tags releases kv_cache, weights and cuda_graph
       (weight_updater.py 343-346, constants.py 6-9); only an idle server may (339-341).
    M2 Touching released memory (a load into released weights, a generation with the KV cache
       released) faults and the scheduler dies: release pauses the torch_memory_saver region,
       which unmaps it (weight_updater.py 365, 374).
    M3 Resumed weights keep their contents only under --enable-weights-cpu-backup (weight_updater
       .py 395-397; model_executor/model_runner_components/load_model_utils.py 307-326);
       otherwise the model computes garbage until weights are loaded.
    H1 /health runs a one-token generation unless SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0;
       /health_generate always does (http_server.py 721-798, environ.py 344).
    H2 /ready answers from the tokenizer manager alone (http_server.py 714-718).
    T1 serialized_named_tensors: one base64 pickle per TP rank, rank r loading entry r
       (managers/tp_worker.py 194-201) with a restricted unpickler (utils/common.py 3144-3370);
       this fake decodes every entry (`decode`) against TENSOR_GLOBALS.
    R1 router=<backend>: sglang-router 0.3.2 in front of `backend` (it forwards /generate there);
       its /generate takes one sampling_params
       dict for the whole batch and answers a per-prompt list with 422 "sampling_params[0]:
       invalid type: map, expected f32" (seen on CPU; the router is a Rust binary).
    V1 weight_version is recorded after a successful load (weight_updater.py 135-136, 152-153).
    A crash (M2, H1 on a released KV cache) answers 500 to that and every later request.
    """

    def __init__(
        self,
        port: int = 0,
        *,
        tp_size: int = 1,
        router: FakeSGLang | None = None,
        health_generates: bool = True,
        cpu_backup: bool = False,
        decode: bool = True,
    ) -> None:
        self.requests: list[tuple[str, dict | None]] = []
        self.errors: list[str] = []
        self.weight_version = "default"
        self.healthy = True
        self.tp_size, self.health_generates, self.cpu_backup = tp_size, health_generates, cpu_backup
        self.decode, self.router = decode, router
        self.session = False
        self.released: set[str] = set()
        self.garbage = False  # M3: weights resumed without contents, not loaded since
        self.crashed: str | None = None
        self.loaded: dict[str, object] = {}  # name -> tensor (decode=True)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, code: int, body: object) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                fake.requests.append((self.path, None))
                if fake.crashed:
                    return self._send(500, {"error": fake.crashed})
                if self.path == "/ready":  # H2
                    return self._send(200 if fake.healthy else 503, None)
                if self.path in ("/health", "/health_generate"):
                    if self.path == "/health_generate" or fake.health_generates:  # H1
                        fake.touch_kv(self.path)
                        if fake.crashed:
                            return self._send(500, {"error": fake.crashed})
                    return self._send(200 if fake.healthy else 503, None)
                self._send(404, {"detail": "Not Found"})

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n)) if n else None
                fake.requests.append((self.path, body))
                if fake.crashed:
                    return self._send(500, {"error": fake.crashed})
                cls = BODY_CLASS.get(self.path)
                if cls is not None:
                    errs = schema_errors(body or {}, cls)
                    if errs:
                        fake.errors += errs
                        return self._send(400, {"error": errs})
                code, out = fake.handle(self.path, body or {})
                self._send(code, out)

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    # --------------------------------------------------------------------------- rules
    def touch_kv(self, what: str) -> None:
        if "kv_cache" in self.released:  # M2
            self.crashed = f"{what} generated with the KV cache released"

    def load(self, what: str, version: str | None) -> tuple[int, dict]:
        if "weights" in self.released:  # M2
            self.crashed = f"{what} wrote into released weights"
            return 500, {"error": self.crashed}
        self.garbage = False
        if version is not None:  # V1
            self.weight_version = version
        return 200, {"success": True, "message": "ok"}

    def handle(self, path: str, body: dict) -> tuple[int, object]:
        refuse = lambda msg: (400, {"success": False, "message": msg})  # noqa: E731
        if path == "/generate":
            if self.router is not None:  # R1
                if isinstance(body.get("sampling_params"), list):
                    return 422, "sampling_params[0]: invalid type: map, expected f32"
                return self.router.handle(path, body)
            self.touch_kv("/generate")
            if self.crashed:
                return 500, {"error": self.crashed}
            return 200, self.generate(body)
        if path == "/begin_weight_update":  # S2
            if self.session:
                return refuse("a weight-update session is already open")
            self.session = True
            return 200, {"success": True, "message": "Success"}
        if path == "/end_weight_update":  # S2
            if not self.session:
                return refuse("no weight-update session is open")
            self.session = False
            return 200, {"success": True, "message": "Success"}
        if path in ("/update_weights_from_tensor", "/update_weights_from_distributed"):
            if not self.session:  # S1
                return refuse(f"{path[1:]} must run between begin_weight_update() and ...")
            if path.endswith("_distributed"):
                return refuse("the fake joins no process group")
            if self.decode:
                err = self.decode_tensors(body["serialized_named_tensors"])
                if err:
                    self.errors.append(err)
                    return refuse(err)
            return self.load(path, body.get("weight_version"))
        if path == "/update_weights_from_disk":  # S3
            shards = sorted(Path(body["model_path"]).glob("*.safetensors"))
            if not shards:
                return refuse(f"no *.safetensors in {body['model_path']}")
            if self.decode:
                from safetensors.torch import load_file

                for shard in shards:
                    self.loaded.update(load_file(str(shard)))
            return self.load(path, body.get("weight_version"))
        if path == "/release_memory_occupation":  # M1
            self.released |= set(body.get("tags") or ALL_TAGS)
            return 200, None
        if path == "/resume_memory_occupation":
            tags = set(body.get("tags") or ALL_TAGS)
            if "weights" in tags & self.released and not self.cpu_backup:  # M3
                self.garbage = True
            self.released -= tags
            return 200, None
        if path == "/destroy_weights_update_group":
            return 200, {"success": True, "message": "ok"}
        if path == "/flush_cache":
            return 200, "Cache flushed."
        return 404, {"detail": "Not Found"}

    def decode_tensors(self, entries: list[str]) -> str | None:
        """T1: one entry per TP rank, each a pickle of (name, tensor) pairs of allowed globals."""
        if len(entries) != self.tp_size:
            return f"serialized_named_tensors has {len(entries)} entries for tp_size {self.tp_size}"

        class Restricted(pickle.Unpickler):
            def find_class(self, module: str, name: str) -> object:
                if (module, name) not in TENSOR_GLOBALS:
                    raise pickle.UnpicklingError(f"global {module}.{name} refused")
                return super().find_class(module, name)

        for entry in entries:
            try:
                named = Restricted(io.BytesIO(base64.b64decode(entry, validate=True))).load()
            except Exception as e:
                return f"tensor payload refused: {e}"
            self.loaded.update({n: t.clone() for n, t in named})
        return None

    def generate(self, body: dict) -> list[dict]:
        out = []
        sps = body["sampling_params"]
        if isinstance(sps, dict):  # one dict for the whole batch
            sps = [sps] * len(body["input_ids"])
        pairs = zip(body["input_ids"], sps, strict=True)
        for i, (prompt, sp) in enumerate(pairs):
            tokens, kind = expected_tokens(prompt, sp)
            if self.garbage:  # M3: the rule breaks, visibly
                tokens = [(p * 7) % 100 for p in prompt][: sp["max_new_tokens"]]
            reason: dict = {"type": kind}
            if kind == "stop":
                reason["matched"] = tokens[-1]
            if kind == "abort":
                reason.update(message="aborted", status_code=500)
            lps = [[0.0 if self.garbage else -(k + 1) / 10, t, None] for k, t in enumerate(tokens)]
            meta = {
                "id": f"r{i}",
                "finish_reason": reason,
                "prompt_tokens": len(prompt),
                "weight_version": self.weight_version,
                "completion_tokens": len(tokens),
                "cached_tokens": 0,
                "input_token_logprobs": [],
                "output_token_logprobs": lps,
                "output_token_logprobs_length": len(lps),
            }
            out.append({"text": "", "output_ids": tokens, "meta_info": meta})
        return out

    def paths(self) -> list[str]:
        return [p for p, _ in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
