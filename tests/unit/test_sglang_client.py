"""SGLangEngine against a fake SGLang HTTP server that checks every body against sglang's schema.

Independent truth: tests/fixtures/sglang_schemas.json is dumped from sglang 0.5.23 itself
(tools/check_sglang_schemas.py: dataclass / msgspec fields of its io_struct request classes and
the generated /generate sampling-params contract), not from our code. The fake server answers
with the response shapes of sglang/srt/entrypoints/http_server.py and tokenizer_manager.py
(meta_info.output_token_logprobs as [logprob, token_id, text], finish_reason {"type": ...}).
Its completions follow a rule written here (token k of prompt p is (p[-1] + k + 1) % 100, log-prob
-(k + 1) / 10), so the expected Completions come from the rule, not from the client.

Launch and restart use a fake `python` (this file run as a script) that answers the version
probe and serves the fake server on --port; no sglang, no GPU.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from rpg_megatron.batch import SamplingParams
from rpg_megatron.config import RolloutConfig, SGLangConfig
from rpg_megatron.rollout import sglang as sg

# ---- begin fake sglang: stdlib only; the fake `python` below execs this part, not the file ----
SCHEMAS = json.loads(
    (Path(__file__).resolve().parents[1] / "fixtures" / "sglang_schemas.json").read_text()
)["classes"]
BODY_CLASS = {
    "/generate": "GenerateReqInput",
    "/update_weights_from_tensor": "UpdateWeightsFromTensorReqInput",
    "/init_weights_update_group": "InitWeightsUpdateGroupReqInput",
    "/update_weights_from_distributed": "UpdateWeightsFromDistributedReqInput",
    "/release_memory_occupation": "ReleaseMemoryOccupationReqInput",
    "/resume_memory_occupation": "ResumeMemoryOccupationReqInput",
}
HF = {"vocab_size": 100, "model_type": "qwen3"}


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


def test_fixture_comes_from_sglang_and_schema_check_bites() -> None:
    assert set(SCHEMAS) == {*BODY_CLASS.values(), "SamplingParams"}
    assert SCHEMAS["InitWeightsUpdateGroupReqInput"]["master_port"]["required"]
    assert schema_errors({"input_ids": [[1]], "sampling_params": [{"seed": 1}]}, "GenerateReqInput")
    assert schema_errors({"input_ids": "x"}, "GenerateReqInput")
    assert schema_errors({"master_address": "a"}, "InitWeightsUpdateGroupReqInput")


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
    """ThreadingHTTPServer speaking sglang's native API; records every request."""

    def __init__(self, port: int = 0) -> None:
        self.requests: list[tuple[str, dict | None]] = []
        self.errors: list[str] = []
        self.weight_version = "default"
        self.healthy = True
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
                if self.path in ("/health", "/health_generate"):
                    self._send(200 if fake.healthy else 503, None)
                else:
                    self._send(404, {"detail": "Not Found"})

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n)) if n else None
                fake.requests.append((self.path, body))
                cls = BODY_CLASS.get(self.path)
                if cls is not None:
                    errs = schema_errors(body, cls)
                    if errs:
                        fake.errors += errs
                        return self._send(400, {"error": errs})
                if self.path == "/generate":
                    return self._send(200, fake.generate(body))
                if self.path == "/update_weights_from_tensor":
                    fake.weight_version = body["weight_version"]
                    return self._send(200, {"success": True, "message": "ok"})
                if self.path in ("/release_memory_occupation", "/resume_memory_occupation"):
                    return self._send(200, None)
                if self.path == "/flush_cache":
                    return self._send(200, "Cache flushed.")
                self._send(404, {"detail": "Not Found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def generate(self, body: dict) -> list[dict]:
        out = []
        pairs = zip(body["input_ids"], body["sampling_params"], strict=True)
        for i, (prompt, sp) in enumerate(pairs):
            tokens, kind = expected_tokens(prompt, sp)
            reason: dict = {"type": kind}
            if kind == "stop":
                reason["matched"] = tokens[-1]
            if kind == "abort":
                reason.update(message="aborted", status_code=500)
            lps = [[-(k + 1) / 10, t, None] for k, t in enumerate(tokens)]
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

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---- end fake sglang ----


@pytest.fixture
def fake():
    server = FakeSGLang()
    yield server
    server.close()
    assert not server.errors, server.errors  # every body we sent fits sglang's schema


@pytest.fixture
def fake_serializer(monkeypatch):
    """sglang's MultiprocessingSerializer is not in the project venv; pickle stands in (the real
    one is exercised by tools/check_sglang_schemas.py --check-payloads)."""
    monkeypatch.setattr(sg, "_import_serializer", lambda: pickle.dumps)


def _attach(fake: FakeSGLang, **kw) -> sg.SGLangEngine:
    cfg = SGLangConfig(server_urls=(fake.url,), health_timeout_s=2, retries=0, **kw)
    return sg.SGLangEngine(RolloutConfig(engine="sglang"), hf_config=HF, sglang=cfg)


BUCKETS = [[("a.weight", torch.ones(2, 3))], [("b.weight", torch.zeros(4)), ("c", torch.ones(1))]]


# ---------------------------------------------------------------------------------- generate
def test_generate_end_to_end(fake, fake_serializer) -> None:
    engine = _attach(fake, prompts_per_request=4, max_concurrency=3)
    with pytest.raises(RuntimeError, match="no weights loaded"):
        engine.generate([[1]], SamplingParams())
    engine.update_weights(BUCKETS, version=7)
    prompts = [[i % 97 + 1, i % 13] for i in range(10)] + [[99, 1]]
    params = SamplingParams(max_new_tokens=5, stop_token_ids=(3,), top_k=None, seed=11)
    out = engine.generate(prompts, params)

    assert [c.prompt_index for c in out] == list(range(11))
    for p, c in zip(prompts, out, strict=True):
        tokens, kind = expected_tokens(p, {"max_new_tokens": 5, "stop_token_ids": [3]})
        assert c.token_ids == tokens and c.finish_reason == kind and c.weight_version == 7
        assert c.logprobs == pytest.approx([-(k + 1) / 10 for k in range(len(tokens))])
    assert {c.finish_reason for c in out} == {"stop", "length", "abort"}

    gens = [b for path, b in fake.requests if path == "/generate"]
    assert sorted(len(b["input_ids"]) for b in gens) == [3, 4, 4]  # batched chunks, concurrent
    sps = [sp for b in gens for sp in b["sampling_params"]]
    assert all(sp["top_k"] == -1 and sp["max_new_tokens"] == 5 for sp in sps)
    assert all(b["return_logprob"] is True for b in gens)
    seeds = [sp["sampling_seed"] for sp in sps]
    assert len(set(seeds)) == 11 and all(0 <= s < 2**63 for s in seeds)
    engine.shutdown()


def test_seeds_depend_on_prompt_index_not_chunking(fake, fake_serializer) -> None:
    seeds = []
    for n in (1, 3, 32):
        engine = _attach(fake, prompts_per_request=n, max_concurrency=1)  # requests in order
        engine.update_weights(BUCKETS, version=0)
        fake.requests.clear()
        engine.generate([[5]] * 6, SamplingParams(max_new_tokens=1, seed=4))
        sps = [sp for p, b in fake.requests if p == "/generate" for sp in b["sampling_params"]]
        seeds.append([sp["sampling_seed"] for sp in sps])
    assert seeds[0] == seeds[1] == seeds[2] and len(set(seeds[0])) == 6
    engine.generate([[5]], SamplingParams(max_new_tokens=1))  # no seed -> none sent
    assert "sampling_seed" not in fake.requests[-1][1]["sampling_params"][0]


def test_weights_sleep_wake_flush(fake, fake_serializer) -> None:
    engine = _attach(fake, tp_size=2)
    engine.update_weights(BUCKETS, version=3)
    ups = [b for p, b in fake.requests if p == "/update_weights_from_tensor"]
    assert [b["flush_cache"] for b in ups] == [False, True]  # flush once, after the last
    assert all(b["weight_version"] == "3" and len(b["serialized_named_tensors"]) == 2 for b in ups)
    back = pickle.loads(base64.b64decode(ups[1]["serialized_named_tensors"][1]))
    assert [n for n, _ in back] == ["b.weight", "c"] and torch.equal(back[0][1], torch.zeros(4))
    engine.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate([[1]], SamplingParams())
    assert engine.health()  # asleep servers are probed with /health
    assert fake.requests[-1][0] == "/health"
    engine.wake()
    engine.flush_cache()
    paths = [p for p, _ in fake.requests]
    assert paths.index("/release_memory_occupation") < paths.index("/resume_memory_occupation")
    assert "/flush_cache" in paths
    engine.shutdown()
    assert not engine.health()
    with pytest.raises(RuntimeError, match="shut down"):
        engine.update_weights(BUCKETS, version=4)


def test_update_failure_is_value_error(fake, fake_serializer, monkeypatch) -> None:
    engine = _attach(fake)
    # The server's loader refuses a name: success=false -> ValueError, engine unusable.
    orig = sg._request
    monkeypatch.setattr(
        sg,
        "_request",
        lambda op, m, url, p, t: (
            {"success": False, "message": "no param zzz"}
            if url.endswith("/update_weights_from_tensor")
            else orig(op, m, url, p, t)
        ),
    )
    with pytest.raises(ValueError, match="no param zzz"):
        engine.update_weights(BUCKETS, version=1)
    with pytest.raises(RuntimeError, match="no weights loaded"):
        engine.generate([[1]], SamplingParams())


def test_attached_refuses_tempered_logprobs(fake, fake_serializer) -> None:
    engine = _attach(fake)
    engine.update_weights(BUCKETS, version=0)
    with pytest.raises(ValueError, match="SGLANG_RETURN_ORIGINAL_LOGPROB"):
        engine.generate([[1]], SamplingParams(temperature=0.7))
    engine = _attach(fake, attached_original_logprobs=True)
    engine.update_weights(BUCKETS, version=0)
    assert engine.generate([[1]], SamplingParams(temperature=0.7, max_new_tokens=2))


def test_serializer_import_error_names_field() -> None:
    if "sglang" in sys.modules or _has_sglang():
        pytest.skip("sglang is installed here")
    with pytest.raises(ImportError, match=r"sglang\.weight_sync='colocated'.*pip install"):
        sg._import_serializer()


def _has_sglang() -> bool:
    import importlib.util

    return importlib.util.find_spec("sglang") is not None


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"sglang\.router_url"):
        SGLangConfig(router_url="http://r:1")
    with pytest.raises(ValueError, match=r"sglang\.weight_sync='nccl'"):
        SGLangConfig(model_path="/m", weight_sync="nccl")
    with pytest.raises(
        ValueError, match=r"rollout\.sglang\.server_urls .* or rollout\.sglang\.model_path"
    ):
        sg.SGLangEngine(RolloutConfig(engine="sglang"), hf_config=HF)


# ---------------------------------------------------------------------------------- failures
def test_attached_dead_server_raises_clearly(fake_serializer) -> None:
    server = FakeSGLang()
    engine = _attach(server)
    engine.update_weights(BUCKETS, version=0)
    server.close()
    with pytest.raises(RuntimeError, match=rf"{server.url}.*attached.*restart them"):
        engine.generate([[1]], SamplingParams(max_new_tokens=1))


def _fake_python(tmp_path: Path, mode: str = "serve") -> str:
    """An executable standing in for `python`: the version probe, then this file's server."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "python"
    script.write_text(
        f"#!{sys.executable}\n"
        "import os, sys, time\n"
        "if sys.argv[1] == '-c':\n"
        f"    print({'0.4.9' if mode == 'old' else '0.5.23'!r}); sys.exit(0)\n"
        f"if {mode!r} == 'crash':\n"
        "    print('boom: CUDA out of memory', flush=True); sys.exit(3)\n"
        f"if {mode!r} == 'hang':\n"
        "    time.sleep(60)\n"
        "assert os.environ.get('SGLANG_RETURN_ORIGINAL_LOGPROB') == '1'\n"
        "port = int(sys.argv[sys.argv.index('--port') + 1])\n"
        # Only the fake-server part of this file, so the child starts without torch (fast).
        "import json, threading\n"
        "from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer\n"
        "from pathlib import Path\n"
        f"src = Path({__file__!r}).read_text()\n"
        "src = src.split('# ---- begin fake sglang')[1].split('# ---- end fake sglang')[0]\n"
        f"ns = dict(globals(), __file__={__file__!r})\n"
        "exec(compile('#' + src, 'fake_sglang', 'exec'), ns)\n"
        "ns['FakeSGLang'](port).thread.join()\n"
    )
    script.chmod(0o755)
    return str(script)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_cfg(tmp_path: Path, mode: str = "serve", **kw) -> SGLangConfig:
    return SGLangConfig(
        model_path="/models/tiny",
        python=_fake_python(tmp_path, mode),
        base_port=_free_port(),
        log_dir=str(tmp_path / "logs"),
        launch_timeout_s=kw.pop("launch_timeout_s", 20),
        health_timeout_s=2,
        retries=0,
        **kw,
    )


def test_launched_server_dies_relaunch_and_reload(tmp_path, fake_serializer) -> None:
    cfg = _launch_cfg(tmp_path)
    engine = sg.SGLangEngine(RolloutConfig(engine="sglang"), hf_config=HF, sglang=cfg)
    try:
        server = engine._servers[0]
        assert server.argv[1:3] == ["-m", "sglang.launch_server"]
        assert "--enable-memory-saver" in server.argv
        engine.update_weights(BUCKETS, version=5)
        first_pid = server.proc.pid
        os.killpg(first_pid, signal.SIGKILL)
        server.proc.wait()
        assert not engine.health()
        # generate fails, sees the dead process, relaunches, reloads version 5 (the fake
        # server would otherwise answer weight_version "default" and generate would raise).
        out = engine.generate([[1, 2]], SamplingParams(max_new_tokens=3))
        assert server.proc.pid != first_pid and engine.health()
        assert out[0].token_ids == [3, 4, 5] and out[0].weight_version == 5
    finally:
        engine.shutdown()
    assert server.proc.poll() is not None


def test_launch_version_crash_and_timeout_errors(tmp_path) -> None:
    rc = RolloutConfig(engine="sglang")
    with pytest.raises(RuntimeError, match=r"0\.4\.9.*outside.*>=0\.5,<0\.6"):
        sg.SGLangEngine(rc, hf_config=HF, sglang=_launch_cfg(tmp_path / "a", "old"))
    with pytest.raises(RuntimeError, match=r"exited with code 3(.|\n)*CUDA out of memory"):
        sg.SGLangEngine(rc, hf_config=HF, sglang=_launch_cfg(tmp_path / "b", "crash"))
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"sglang\.launch_timeout_s=1\.0"):
        sg.SGLangEngine(
            rc, hf_config=HF, sglang=_launch_cfg(tmp_path / "c", "hang", launch_timeout_s=1.0)
        )
    assert time.monotonic() - t0 < 10  # and the hung process was stopped, not waited for


def test_import_is_lazy() -> None:
    code = (
        "import sys, torch.distributed as dist\n"
        "import rpg_megatron.rollout.sglang\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('sglang', 'sglang_router')]\n"
        "assert not bad, bad\n"
        "assert not dist.is_initialized()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
