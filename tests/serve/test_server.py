"""`tokenmill serve` as a real process on a free loopback port, with SmolLM2 (and all-MiniLM for embeddings): the real
`openai` client (chat and completions, streamed and not, usage), streamed text equal to non-streamed text, a
mid-stream disconnect freeing its blocks (seen in /metrics), 429 past the queue, 401 without the key, 400 bodies for
each bad-request kind, /health and /metrics, and SIGTERM with requests in flight. Every test bounds its request
count and time, and talks to 127.0.0.1 only."""

from __future__ import annotations

import concurrent.futures as cf
import http.client
import json
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from helpers import tokenmill_cmd

KEY = "test-key"
MSGS = [{"role": "user", "content": "Write two sentences about the sea."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port, method, path, body=None, key=KEY, raw: bytes | None = None, timeout=120):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers=headers)
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), payload


def metrics(port) -> dict[str, float]:
    _, _, body = request(port, "GET", "/metrics", key=None)
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def metric(port, name: str, **labels) -> float:
    for key, value in metrics(port).items():
        if key.startswith(f"tokenmill:{name}{{") and all(f'{k}="{v}"' in key for k, v in labels.items()):
            return value
    raise KeyError(name)


class Server:
    def __init__(self, env, *args) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(tokenmill_cmd("serve", "--port", self.port, *args), env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stderr.read()
            try:
                if request(self.port, "GET", "/health", key=None, timeout=5)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError("the server did not become ready")

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=KEY, timeout=120, max_retries=0)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=120)


@pytest.fixture(scope="module")
def server(cli_env, smollm2):
    s = Server(cli_env, "--api-key", KEY, "--max-num-seqs", 2, "--max-queued-requests", 2, "--max-model-len", 256,
               "--embedding-model", "default", "--prefix-caching")
    yield s
    s.stop()


def wait_idle(port, timeout=60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (metric(port, "num_requests_running") == 0 and metric(port, "num_requests_waiting") == 0
                and metric(port, "kv_cache_usage_perc") == 0):
            return
        time.sleep(0.05)
    raise AssertionError(f"the server did not go idle: {metrics(port)}")


def test_chat_streamed_equals_non_streamed_with_usage(server):
    c = server.client()
    model = c.models.list().data[0].id
    full = c.chat.completions.create(model=model, messages=MSGS, max_tokens=40, temperature=0)
    assert full.usage.completion_tokens <= 40 and full.usage.total_tokens == full.usage.prompt_tokens + 40 or \
        full.choices[0].finish_reason == "stop"
    pieces, usage, reasons = [], None, []
    for ch in c.chat.completions.create(model=model, messages=MSGS, max_tokens=40, temperature=0, stream=True,
                                        stream_options={"include_usage": True}):
        if ch.usage is not None:
            usage = ch.usage
        for choice in ch.choices:
            pieces.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    assert "".join(pieces) == full.choices[0].message.content and len(pieces) > 3
    assert reasons[-1] == full.choices[0].finish_reason and usage.completion_tokens == full.usage.completion_tokens
    # sampled with a seed: the same text streamed and not
    a = c.chat.completions.create(model=model, messages=MSGS, max_tokens=30, temperature=0.9, seed=7)
    b = "".join((ch.choices[0].delta.content or "") for ch in c.chat.completions.create(
        model=model, messages=MSGS, max_tokens=30, temperature=0.9, seed=7, stream=True) if ch.choices)
    assert a.choices[0].message.content == b


def test_completions_stream_never_sends_a_stop_string(server):
    c = server.client()
    model = c.models.list().data[0].id
    kw = dict(model=model, prompt="A list of fruits: apple, pear, banana,", max_tokens=60, temperature=0, stop=[","])
    full = c.completions.create(**kw)
    text = "".join(ch.choices[0].text for ch in c.completions.create(**kw, stream=True) if ch.choices)
    assert text == full.choices[0].text and "," not in text
    assert full.choices[0].finish_reason == "stop"


def test_response_format_json_schema_streamed_and_not(server):
    import jsonschema

    schema = {"type": "object", "additionalProperties": False, "required": ["city", "country"],
              "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"type": "string",
                                                                                       "maxLength": 20}}}
    c = server.client()
    model = c.models.list().data[0].id
    kw = dict(model=model, messages=[{"role": "user", "content": "Name a city and its country, as JSON."}],
              max_tokens=60, temperature=0,
              response_format={"type": "json_schema", "json_schema": {"name": "place", "strict": True,
                                                                      "schema": schema}})
    full = c.chat.completions.create(**kw)
    jsonschema.validate(json.loads(full.choices[0].message.content), schema)
    text = "".join((ch.choices[0].delta.content or "") for ch in c.chat.completions.create(**kw, stream=True)
                   if ch.choices)
    assert text == full.choices[0].message.content


def test_bad_requests_get_400_with_an_openai_error_body(server):
    port = server.port
    model = server.client().models.list().data[0].id
    chat = {"model": model, "messages": MSGS}
    cases = [
        (None, b"{not json", "not valid JSON"),
        ({**chat, "model": "gpt-9"}, None, "does not exist"),
        ({**chat, "temperature": -1}, None, "temperature"),
        ({**chat, "n": 2, "best_of": 3, "stream": True}, None, "best_of"),
        ({**chat, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no"}}}},
         None, "invalid json"),
        ({**chat, "response_format": {"type": "xml"}}, None, "response_format"),
        ({**chat, "tools": [{"type": "function", "function": {"name": "f"}}]}, None, "tools"),
        ({"model": model, "prompt": list(range(5, 400))}, None, "max_model_len"),
        ({**chat, "messages": "hi"}, None, "messages"),
        ({**chat, "stream": "yes"}, None, "stream"),
    ]
    for body, raw, needle in cases:
        path = "/v1/completions" if body and "prompt" in body else "/v1/chat/completions"
        status, _, payload = request(port, "POST", path, body, raw=raw)
        err = json.loads(payload)["error"]
        assert status == 400 and needle in err["message"], (body, payload)
        assert err["type"] == "invalid_request_error"
    status, _, payload = request(port, "POST", "/v1/chat/completions", chat, key=None)
    assert status == 401 and json.loads(payload)["error"]["code"] == "invalid_api_key"
    status, _, _ = request(port, "POST", "/v1/chat/completions", chat, key="wrong")
    assert status == 401


def test_disconnect_mid_stream_frees_the_request(server):
    port = server.port
    wait_idle(port)
    aborted = metric(port, "request_success_total", finished_reason="abort")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = {"messages": MSGS, "max_tokens": 200, "temperature": 0, "stream": True}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Authorization": f"Bearer {KEY}",
                                                                      "Content-Type": "application/json"})
    resp = conn.getresponse()
    got = b""
    while got.count(b"data:") < 4:
        got += resp.read1(4096)
    assert metric(port, "num_requests_running") == 1 and metric(port, "kv_cache_usage_perc") > 0
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_idle(port)
    assert metric(port, "request_success_total", finished_reason="abort") == aborted + 1


def test_a_full_queue_answers_429_then_the_server_drains(server):
    port = server.port
    wait_idle(port)
    body = {"messages": MSGS, "max_tokens": 48, "temperature": 0}
    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: request(port, "POST", "/v1/chat/completions", body), range(8)))
    codes = sorted(r[0] for r in results)
    assert codes.count(200) >= 2 and codes.count(429) >= 1 and set(codes) <= {200, 429}, codes
    for status, headers, payload in results:
        if status == 429:
            assert headers.get("retry-after") == "1"
            assert json.loads(payload)["error"]["type"] == "rate_limit_error"
    wait_idle(port)


def test_health_models_metrics_and_embeddings(server, minilm):
    port = server.port
    status, _, body = request(port, "GET", "/health", key=None)
    assert status == 200 and json.loads(body)["status"] == "ok"
    names = {m.id for m in server.client().models.list().data}
    assert "all-MiniLM-L6-v2" in names and len(names) == 2
    text = metrics(port)
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total",
                 "generation_tokens_total", "num_preemptions_total", "request_success_total",
                 "time_to_first_token_seconds_count", "inter_token_latency_seconds_count",
                 "e2e_request_latency_seconds_count", "request_queue_time_seconds_count",
                 "iteration_tokens_total_count", "prefix_cache_queries_total", "prefix_cache_hits_total"):
        assert any(k.startswith(f"tokenmill:{name}{{") and 'model_name="' in k for k in text), name
    assert metric(port, "generation_tokens_total") > 0 and metric(port, "e2e_request_latency_seconds_count") > 0
    # the chat requests before this test share their template's system prompt (and some their messages)
    assert 0 < metric(port, "prefix_cache_hits_total") < metric(port, "prefix_cache_queries_total")
    texts = ["the river flooded the old mill", "a violin concerto"]
    emb = server.client().embeddings.create(model="all-MiniLM-L6-v2", input=texts)
    got = np.asarray([d.embedding for d in emb.data], dtype=np.float32)
    ref = minilm.encode(texts)
    assert got.shape == (2, 384) and float(np.min(np.sum(got * ref, axis=1))) >= 0.9999
    assert emb.usage.prompt_tokens > 4


def test_the_load_generator_counts_what_the_server_sends(server):
    """benchmarks/serve_load.py (raw server-sent events over aiohttp) against this server: every request completes,
    the output tokens are the usage's, and the latency figures are consistent."""
    import asyncio

    from benchmarks.serve_load import run_load

    model = server.client().models.list().data[0].id
    prompts = [{"prompt": "Once upon a time", "max_tokens": 6}, {"prompt": [1, 2, 3, 4], "max_tokens": 4},
               {"prompt": "The sea is", "max_tokens": 5}]
    res = asyncio.run(run_load(f"http://127.0.0.1:{server.port}/v1", model, prompts, concurrency=2, api_key=KEY,
                               extra={"ignore_eos": True}))
    assert res["completed"] == 3 and res["failed"] == 0
    assert res["output_tok_s"] * res["wall_s"] == pytest.approx(15)
    assert 0 < res["ttft_ms"]["p50"] <= res["e2e_ms"]["p50"] and res["tpot_ms"]["p50"] > 0
    bad = asyncio.run(run_load(f"http://127.0.0.1:{server.port}/v1", model, prompts[:1], api_key="wrong"))
    assert bad["failed"] == 1 and bad["failures"][0].startswith("HTTP 401")


def test_sigterm_lets_in_flight_requests_finish_then_exits_0(cli_env):
    s = Server(cli_env, "--max-num-seqs", 2, "--shutdown-timeout", 60)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=120)
        body = {"messages": MSGS, "max_tokens": 40, "temperature": 0, "stream": True}
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        got = resp.read1(4096)
        s.proc.send_signal(signal.SIGTERM)  # mid-stream
        while not got.rstrip().endswith(b"data: [DONE]"):
            more = resp.read1(4096)
            assert more, f"the stream was cut: {got[-300:]!r}"
            got += more
        assert b'"finish_reason": "length"' in got or b'"finish_reason": "stop"' in got
        assert s.proc.wait(timeout=120) == 0
        with pytest.raises(OSError):
            request(s.port, "GET", "/health", key=None, timeout=5)
    finally:
        s.stop()
