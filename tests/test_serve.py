"""`kvtrt serve`: the official `openai` client against real uvicorn servers on 127.0.0.1 (in a thread,
or `kvtrt serve` in a subprocess), checked against `llm.generate` on the same prompts; errors, a
mixed concurrent load, client disconnects, a soak, SIGTERM, and `kvtrt loadtest`.
Every loop here is bounded; nothing is sent anywhere but 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

for _module in ("fastapi", "uvicorn", "prometheus_client", "httpx", "openai"):
    pytest.importorskip(_module, reason="the serve extra is not installed: pip install 'kvtrt[serve,test]'")

import httpx  # noqa: E402
import openai  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import kvtrt  # noqa: E402
from kvtrt.serve import create_app  # noqa: E402
from kvtrt.serve.server import ServerThread, free_port, wait_ready  # noqa: E402

HOST = "127.0.0.1"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}]


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm(tiny_llama):
    llm = kvtrt.load(tiny_llama[2])
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def server(llm):
    with ServerThread(create_app(llm, served_model_name="tiny"), host=HOST) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tiny_long(tmp_path_factory):
    """A tiny export with 4096 positions and prompts whose greedy continuation runs 3000 tokens without
    EOS (found by generating), so a request is surely still decoding when a test interrupts it."""
    from tiny import tiny_model, tiny_tokenizer

    from kvtrt.export import export_model

    directory = tmp_path_factory.mktemp("tiny-long")
    export_model((tiny_model("llama", max_position_embeddings=4096), tiny_tokenizer()), directory, progress=False,
                 score_window=4)
    llm = kvtrt.load(directory)
    found = {}
    for i in range(16):
        prompt = f"request {i}: tell me a long story"
        result = llm.generate(prompt, max_new_tokens=3000)
        if result.finish_reason == "length":
            found[prompt] = result.text
        if len(found) == 3:
            break
    assert len(found) == 3, "no prompts of the tiny model decode 3000 tokens without EOS"
    yield directory, llm, found
    llm.close()


def scrape(url: str) -> dict[str, float]:
    """/metrics as {sample name: value} (this server's one model label)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if set(sample.labels) <= {"model_name"}:
                out[sample.name] = sample.value
    return out


def post(url: str, body, path: str = "/v1/chat/completions", **kw) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(url + path, content=content, headers={"content-type": "application/json", **kw.pop("headers", {})},
                      timeout=60, **kw)


def openai_reason(result) -> str:
    return "stop" if result.finish_reason in ("eos", "stop") else result.finish_reason


# -- correctness against llm.generate ------------------------------------------------------------------
def test_chat_completion_equals_generate_with_usage(client, llm):
    ref = llm.generate(MESSAGES, max_new_tokens=24)
    answer = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0)
    assert answer.object == "chat.completion" and answer.model == "tiny"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == ref.text
    assert answer.choices[0].finish_reason == openai_reason(ref)
    assert answer.usage.prompt_tokens == len(llm.encode(MESSAGES)) == len(ref.prompt_ids)
    assert answer.usage.completion_tokens == len(ref.token_ids)
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    # max_completion_tokens is the newer name of the same limit
    newer = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=24, temperature=0)
    assert newer.choices[0].message.content == ref.text


def test_streamed_chat_and_completion_equal_generate(client, llm):
    ref = llm.generate(MESSAGES, max_new_tokens=40)
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=40, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == [openai_reason(ref)]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)
    assert chunks[-1].usage.prompt_tokens == len(ref.prompt_ids)

    prompt = "The quick brown fox"
    ref = llm.generate(prompt, max_new_tokens=30)
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=30, temperature=0)
    assert whole.choices[0].text == ref.text and whole.usage.completion_tokens == len(ref.token_ids)
    streamed = client.completions.create(model="tiny", prompt=prompt, max_tokens=30, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == ref.text
    # token ids as the prompt, as /v1/completions allows
    ids = llm.encode(prompt)
    assert client.completions.create(model="tiny", prompt=ids, max_tokens=30, temperature=0).choices[0].text == ref.text


def test_raw_sse_framing(server, llm):
    """`data: {chunk}` events separated by blank lines, closed by `data: [DONE]`."""
    body = {"model": "tiny", "prompt": "abc", "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"} and len({c["id"] for c in chunks}) == 1
    assert "".join(c["choices"][0]["text"] for c in chunks) == llm.generate("abc", max_new_tokens=5).text


def test_stop_strings(client, llm):
    prompt = "Once upon a time"
    full = llm.generate(prompt, max_new_tokens=48)
    printable = [i for i in range(6, len(full.text) - 2) if full.text[i:i + 2].isprintable() and full.text[i:i + 2].strip()]
    assert printable, f"no printable pair in {full.text!r}"
    stop = full.text[printable[0]:printable[0] + 2]
    ref = llm.generate(prompt, max_new_tokens=48, stop=[stop])
    assert ref.finish_reason == "stop" and full.text.startswith(ref.text) and stop not in ref.text
    answer = client.completions.create(model="tiny", prompt=prompt, max_tokens=48, temperature=0, stop=stop)
    assert answer.choices[0].text == ref.text and answer.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt=prompt, max_tokens=48, temperature=0, stop=[stop, "\x00"],
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == ref.text


def test_per_request_kv_spec(client, llm):
    """The `kv` extension: a compaction spec for one request equals llm.generate with that spec."""
    spec = "kvcrush:budget=0.5,base=snapkv"
    prompt = "a fairly long prompt so that compaction has something to drop: " + "lorem ipsum dolor sit amet " * 6
    ref = llm.generate(prompt, max_new_tokens=20, kv=spec)
    answer = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0, extra_body={"kv": spec})
    assert answer.choices[0].text == ref.text
    assert answer.choices[0].text != llm.generate(prompt, max_new_tokens=20).text or ref.stats.compactions >= 1


def test_sampling_fields_are_honoured(client, llm):
    kw = dict(max_new_tokens=16, temperature=0.9, top_k=20, top_p=0.9, seed=7)
    ref = llm.generate("sample me", **kw)
    answer = client.completions.create(model="tiny", prompt="sample me", max_tokens=16, temperature=0.9, top_p=0.9,
                                       seed=7, extra_body={"top_k": 20})
    assert answer.choices[0].text == ref.text
    # vLLM's extensions: repetition_penalty, min_tokens, ignore_eos
    ref = llm.generate(MESSAGES, max_new_tokens=30, ignore_eos=True, repetition_penalty=1.3, min_new_tokens=5)
    answer = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=30, temperature=0,
                                            extra_body={"ignore_eos": True, "repetition_penalty": 1.3, "min_tokens": 5})
    assert answer.choices[0].message.content == ref.text
    assert answer.usage.completion_tokens == 30 and answer.choices[0].finish_reason == "length"


# -- routes and errors ----------------------------------------------------------------------------------
def test_models_health_metrics(client, server, llm):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    client.completions.create(model="tiny", prompt="count me", max_tokens=3, temperature=0)
    m = scrape(server.url)
    for name in ("kvtrt:num_requests_running", "kvtrt:num_requests_waiting", "kvtrt:kv_cache_usage_bytes",
                 "kvtrt:prompt_tokens_total", "kvtrt:generation_tokens_total", "kvtrt:reused_prefix_tokens_total",
                 "kvtrt:kv_compactions_total", "kvtrt:time_to_first_token_seconds_count",
                 "kvtrt:inter_token_latency_seconds_count", "kvtrt:e2e_request_latency_seconds_count"):
        assert name in m, name
    stats = llm.stats()
    assert m["kvtrt:generation_tokens_total"] == stats.generation_tokens_total
    assert m["kvtrt:prompt_tokens_total"] == stats.prompt_tokens_total
    assert m["kvtrt:e2e_request_latency_seconds_count"] >= 1


def test_health_is_503_until_loaded(tiny_llama):
    gate = threading.Event()

    def loader():
        gate.wait(30)
        return kvtrt.load(tiny_llama[2])

    with ServerThread(create_app(loader, served_model_name="late"), host=HOST) as srv:
        assert httpx.get(srv.url + "/health").status_code == 503
        early = post(srv.url, {"model": "late", "messages": MESSAGES, "max_tokens": 2})
        assert early.status_code == 503 and early.json()["error"]["code"] == "model_not_ready"
        gate.set()
        wait_ready(srv.url, timeout=60)
        assert post(srv.url, {"model": "late", "messages": MESSAGES, "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("body, status, param, code", [
    ("{not json", 400, None, "invalid_json"),
    ('["a list"]', 400, None, "invalid_body"),
    ({"model": "tiny", "messages": "hello"}, 400, "messages", None),
    ({"model": "tiny", "messages": MESSAGES, "max_tokens": "ten"}, 400, "max_tokens", None),
    ({"model": "tiny", "messages": MESSAGES, "temperature": "hot"}, 400, "temperature", None),
    ({"model": "tiny", "messages": MESSAGES, "n": 2}, 400, "n", None),
    ({"model": "tiny", "messages": MESSAGES, "kv": "kvcrush:budget=lots"}, 400, "kv", "invalid_kv_spec"),
    ({"model": "tiny", "messages": MESSAGES, "kv": "nonsense"}, 400, "kv", "invalid_kv_spec"),
    ({"model": "tiny", "messages": MESSAGES, "max_tokens": 100000}, 400, "messages", "context_length_exceeded"),
    ({"model": "other", "messages": MESSAGES}, 404, "model", "model_not_found"),
])
def test_errors_have_openai_shape(server, body, status, param, code):
    response = post(server.url, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if code:
        assert error["code"] == code


def test_context_length_error_names_the_numbers(client, llm):
    prompt = "x" * 600  # byte tokenizer: ~600 tokens against 512 positions
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt=prompt, max_tokens=8)
    message = info.value.body["message"]
    assert info.value.body["code"] == "context_length_exceeded"
    assert str(llm.manifest.max_positions) in message and str(len(llm.encode(prompt))) in message
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=MESSAGES, n=2)
    assert info.value.body["param"] == "n"


def test_api_key(llm):
    with ServerThread(create_app(llm, served_model_name="tiny", api_key="s3cret"), host=HOST) as srv:
        for key in ("wrong", None):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            response = post(srv.url, {"model": "tiny", "messages": MESSAGES, "max_tokens": 2}, headers=headers)
            assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0) \
            .choices[0].message.content == llm.generate(MESSAGES, max_new_tokens=4).text
        assert httpx.get(srv.url + "/health").status_code == 200  # probes need no key


def test_queue_full_is_429_with_retry_after(tiny_llama):
    full = kvtrt.load(tiny_llama[2], max_queue=0)  # no request may wait: every submit is refused
    try:
        with ServerThread(create_app(full, served_model_name="tiny"), host=HOST) as srv:
            response = post(srv.url, {"model": "tiny", "messages": MESSAGES, "max_tokens": 4})
            assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
            assert response.json()["error"]["type"] == "rate_limit_error"
            with pytest.raises(openai.RateLimitError):
                openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0).completions.create(
                    model="tiny", prompt="hi", max_tokens=2)
    finally:
        full.close()


def test_kv_memory_error_is_400(tiny_llama):
    small = kvtrt.load(tiny_llama[2], kv_memory=4096)
    try:
        with ServerThread(create_app(small, served_model_name="tiny"), host=HOST) as srv:
            response = post(srv.url, {"model": "tiny", "messages": MESSAGES, "max_tokens": 400})
            assert response.status_code == 400 and response.json()["error"]["code"] == "kv_memory_exceeded"
            assert "kv_memory" in response.json()["error"]["message"]
    finally:
        small.close()


# -- concurrency, disconnects, soak, SIGTERM ---------------------------------------------------------
def test_concurrent_streams_with_bad_requests(server, llm):
    """16 clients x 10 streaming requests, one bad request in ten: every good one gets exactly its
    served-alone text, every bad one its 4xx, nothing else fails."""
    prompts = [f"client prompt {k}: " + "word " * (k * 7 % 40) for k in range(16)]
    limits = [8, 16, 24]
    bad_bodies = [
        dict(n=3), dict(extra_body={"kv": "freekv:budget=zero"}), dict(prompt="y" * 700),
        dict(extra_body={"top_k": "many"}),
    ]
    alone = {(p, m): llm.generate(prompts[p], max_new_tokens=m).text for p in range(16) for m in limits}
    outcomes = []

    def run_client(c: int):
        api = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        for j in range(10):
            p, m = (c + j) % 16, limits[(c * 3 + j) % 3]
            if (c + j) % 10 == 0:
                bad = dict(bad_bodies[(c + j) // 10 % len(bad_bodies)])
                try:
                    list(api.completions.create(model="tiny", **{"prompt": prompts[p], "max_tokens": m,
                                                                 "stream": True, **bad}))
                    outcomes.append(("bad accepted", c, j, bad))
                except openai.BadRequestError as exc:
                    outcomes.append(("bad", exc.status_code))
                continue
            text = "".join(chunk.choices[0].text for chunk in api.completions.create(
                model="tiny", prompt=prompts[p], max_tokens=m, temperature=0, stream=True))
            outcomes.append(("good", text == alone[(p, m)], c, j))

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(run_client, range(16)))  # re-raises any unexpected client error
    good = [o for o in outcomes if o[0] == "good"]
    bad = [o for o in outcomes if o[0] == "bad"]
    assert len(good) + len(bad) == 160, [o for o in outcomes if o[0] not in ("good", "bad")]
    assert len(bad) == 16 and all(status == 400 for _, status in bad)
    assert all(o[1] for o in good), [o for o in good if not o[1]][:5]
    m = scrape(server.url)
    assert m["kvtrt:num_requests_running"] == 0 and m["kvtrt:kv_cache_usage_bytes"] == 0


def test_disconnect_cancels_and_frees_kv(tiny_long):
    directory, long_llm, texts = tiny_long
    prompt = next(iter(texts))
    with ServerThread(create_app(long_llm, served_model_name="long"), host=HOST) as srv:
        before = scrape(srv.url)
        body = {"model": "long", "prompt": prompt, "max_tokens": 3000, "temperature": 0, "stream": True}
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", srv.url + "/v1/completions", json=body) as response:
                assert response.status_code == 200
                lines = response.iter_lines()  # kept referenced: dropping the iterator would close the stream
                seen = 0
                while seen < 3:
                    seen += next(lines).startswith("data: ")
                during = scrape(srv.url)
                assert during["kvtrt:num_requests_running"] == 1 and during["kvtrt:kv_cache_usage_bytes"] > 0
        # the connection is closed: the server must cancel the request and free its KV
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            after = scrape(srv.url)
            if after["kvtrt:kv_cache_usage_bytes"] == 0 and after["kvtrt:num_requests_running"] == 0:
                break
            time.sleep(0.05)
        assert after["kvtrt:kv_cache_usage_bytes"] == 0 and after["kvtrt:num_requests_running"] == 0
        assert after["kvtrt:requests_cancelled_total"] == before.get("kvtrt:requests_cancelled_total", 0) + 1
        assert after["kvtrt:requests_cancelled_by_client_total"] == 1
        # cancelled, not run to its end: far fewer than 3000 tokens were generated
        assert after["kvtrt:generation_tokens_total"] - before["kvtrt:generation_tokens_total"] < 2500

        # a non-streaming request whose client gives up is cancelled too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/completions", json={**body, "stream": False}, timeout=0.3)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            after = scrape(srv.url)
            if after["kvtrt:requests_cancelled_total"] == before.get("kvtrt:requests_cancelled_total", 0) + 2:
                break
            time.sleep(0.05)
        assert after["kvtrt:requests_cancelled_total"] == before.get("kvtrt:requests_cancelled_total", 0) + 2
        assert after["kvtrt:kv_cache_usage_bytes"] == 0


def _serve_process(directory, port, *extra, log_path):
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "kvtrt.cli", "serve", str(directory), "--host", HOST,
                             "--port", str(port), "--log-level", "warning", "--served-model-name", "sub", *extra],
                            stdout=log, stderr=subprocess.STDOUT)
    return proc, log


def test_soak_rss_stable(tiny_llama, tmp_path):
    """500 short requests against `kvtrt serve` in a subprocess: its RSS after 500 is within 5% of
    its RSS after the first 50."""
    psutil = pytest.importorskip("psutil")
    port = free_port()
    proc, log = _serve_process(tiny_llama[2], port, "--threads", "1", log_path=tmp_path / "serve.log")
    url = f"http://{HOST}:{port}"
    try:
        wait_ready(url, timeout=120, proc=proc)
        process = psutil.Process(proc.pid)

        http = httpx.Client(timeout=60, limits=httpx.Limits(max_connections=4))

        def one(i: int) -> int:
            r = http.post(url + "/v1/completions", json={"model": "sub", "prompt": f"soak {i} " + "z" * (i % 50),
                                                          "max_tokens": 1 + i % 6, "temperature": 0,
                                                          "stream": i % 2 == 0})
            return r.status_code

        rss = {}
        with http, ThreadPoolExecutor(4) as pool:
            assert set(pool.map(one, range(50))) == {200}
            rss[50] = process.memory_info().rss
            assert set(pool.map(one, range(50, 500))) == {200}
            rss[500] = process.memory_info().rss
        m = scrape(url)
        assert m["kvtrt:requests_finished_total"] >= 500 and m["kvtrt:kv_cache_usage_bytes"] == 0
        drift = rss[500] / rss[50] - 1
        assert abs(drift) <= 0.05, f"RSS {rss[50] / 2**20:.1f} -> {rss[500] / 2**20:.1f} MiB ({drift:+.1%})"
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()


def test_sigterm_lets_requests_finish_then_exits_0(tiny_long, tmp_path):
    directory, _, texts = tiny_long
    port = free_port()
    proc, log = _serve_process(directory, port, "--drain-timeout", "60", log_path=tmp_path / "serve.log")
    url = f"http://{HOST}:{port}"
    try:
        wait_ready(url, timeout=120, proc=proc)
        started = [threading.Event() for _ in texts]
        results: dict[str, object] = {}

        def stream(k: int, prompt: str):
            body = {"model": "sub", "prompt": prompt, "max_tokens": 3000, "temperature": 0, "stream": True}
            try:
                pieces, reason = [], None
                with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as response:
                    for line in response.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        choice = json.loads(line[6:])["choices"][0]
                        pieces.append(choice["text"])
                        reason = choice["finish_reason"] or reason
                        started[k].set()
                results[prompt] = ("".join(pieces), reason)
            except Exception as exc:  # reported by the assertions below
                results[prompt] = exc
            finally:
                started[k].set()

        threads = [threading.Thread(target=stream, args=(k, p)) for k, p in enumerate(texts)]
        for t in threads:
            t.start()
        for event in started:
            assert event.wait(60)
        assert scrape(url)["kvtrt:num_requests_running"] == len(texts)  # all in flight
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.HTTPError):  # no new connections while draining
            httpx.get(url + "/health", timeout=2)
        for t in threads:
            t.join(120)
        assert proc.wait(60) == 0
        for prompt, text in texts.items():
            assert results[prompt] == (text, "length"), f"{prompt!r}: {results[prompt]!r:.200}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        log.close()


# -- loadtest ------------------------------------------------------------------------------------------
def test_percentile():
    from kvtrt.eval.loadtest import percentile

    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile(list(range(101)), 99) == pytest.approx(99.0)


def test_loadtest_against_server(server, llm, tmp_path):
    from kvtrt.eval.loadtest import run_loadtest, table

    before = scrape(server.url)
    rows = asyncio.run(run_loadtest(server.url + "/v1", [1, 3], 120, 6, 6, progress=False, label="tiny"))
    after = scrape(server.url)
    assert [r["concurrency"] for r in rows] == [1, 3]
    for row in rows:
        assert row["requests"] == row["ok"] == 6 and row["errors"] == 0 and row["model"] == "tiny"
        assert row["throughput_tok_s"] == pytest.approx(row["output_tokens"] / row["wall_s"])
        assert 0 < row["ttft_p50_s"] <= row["ttft_p99_s"] <= row["e2e_p99_s"]
        assert 1 <= row["mean_output_tokens"] <= 6
        assert abs(row["mean_prompt_tokens"] - 120) <= 3  # sized by the server's usage count
    # every output token the loadtest counted is one the server generated (+ 3 calibration requests of
    # 1 token and a warm-up of at most 6)
    counted = sum(r["output_tokens"] for r in rows)
    served = after["kvtrt:generation_tokens_total"] - before["kvtrt:generation_tokens_total"]
    assert counted <= served <= counted + 3 + 6
    assert "| tiny | 1 |" in table(rows)

    # the raw completions endpoint works too
    raw = asyncio.run(run_loadtest(server.url, [2], 80, 4, 4, progress=False, model="tiny", endpoint="completions"))
    assert raw[0]["errors"] == 0 and raw[0]["ok"] == 4
    # a wrong model name: every request is an error, counted and described
    from kvtrt.eval import loadtest

    records, _, samples = asyncio.run(loadtest.run_level(server.url, "chat", "nope", loadtest.Prompts("abc " * 500, 20),
                                                         2, 4, 4, {}, progress=False, server_pid=os.getpid()))
    row = loadtest.summarize(records, 2, 1.0)
    assert row["errors"] == 4 and row["ok"] == 0 and any(k.startswith("404") for k in row["error_kinds"])
    # the RSS of --server-pid is sampled as requests end: the first sample at once, then every RSS_SAMPLE_S
    assert samples[0][0] == 1 and samples[0][2] > 0


def test_loadtest_plot_adds_the_rss_curve_of_a_soak(tmp_path):
    pytest.importorskip("matplotlib")
    from kvtrt.eval.loadtest import plot

    row = {"label": "soak", "concurrency": 4, "throughput_tok_s": 10.0, "ttft_p99_s": 1.0, "itl_p50_s": 0.1,
           "itl_p99_s": 0.2, "server_rss_samples": [(1, 1.0, 100.0), (60, 20.0, 110.0), (120, 40.0, 111.0)]}
    paths = plot(tmp_path / "soak.png", [row], "soak")
    assert [p.name for p in paths] == ["soak.png", "soak_rss.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    assert [p.name for p in plot(tmp_path / "levels.png", [{**row, "server_rss_samples": []}], "t")] == ["levels.png"]


def test_rss_drift_is_measured_after_the_warmup_requests():
    from kvtrt.eval.loadtest import rss_drift

    samples = [(10, 1.0, 100.0), (50, 20.0, 200.0), (120, 40.0, 204.0), (400, 90.0, 210.0)]
    assert rss_drift(samples) == pytest.approx(210 / 200)  # the 100 MiB before 50 requests is warm-up
    assert rss_drift(samples, after=0) == pytest.approx(2.1)
    assert rss_drift(samples[:2]) is None  # one settled sample: no drift to state


def test_loadtest_cli_writes_json_and_png(server, tmp_path):
    pytest.importorskip("matplotlib")
    out_json, out_png = tmp_path / "lt.json", tmp_path / "lt.png"
    done = subprocess.run([sys.executable, "-m", "kvtrt.cli", "loadtest", server.url, "--concurrency", "1,2",
                           "--prompt-tokens", "30", "--max-tokens", "4", "--requests", "4", "--json", str(out_json),
                           "--plot", str(out_png), "--label", "tiny", "-q"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out_json.read_text())
    assert [r["concurrency"] for r in rows] == [1, 2] and all(r["errors"] == 0 for r in rows)
    assert out_png.stat().st_size > 1000 and "out tok/s" in done.stdout


# -- the command line -----------------------------------------------------------------------------------
def test_serve_cli_help_and_missing_extras(monkeypatch, tiny_llama, capsys):
    from kvtrt.cli import command_options, command_parsers, main

    parsers = command_parsers()
    serve_options = {o for a in command_options(parsers["serve"]) for o in a.option_strings}
    assert {"--kv", "--kv-memory", "--max-queue", "--host", "--port", "--api-key", "--served-model-name", "--threads",
            "--ray", "--replicas", "--drain-timeout"} <= serve_options
    assert {"--concurrency", "--prompt-tokens", "--max-tokens", "--requests", "--json", "--plot", "--model",
            "--api-key"} <= {o for a in command_options(parsers["loadtest"]) for o in a.option_strings}
    assert all(a.help for name in ("serve", "loadtest") for a in command_options(parsers[name]))
    directory = str(tiny_llama[2])
    monkeypatch.setitem(sys.modules, "fastapi", None)  # find_spec now says: not installed
    assert main(["serve", directory, "--port", str(free_port())]) == 2
    assert "pip install 'kvtrt[serve]'" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "ray", None)
    assert main(["serve", directory, "--ray", "--port", str(free_port())]) == 2
    assert "pip install 'kvtrt[ray]'" in capsys.readouterr().err


# -- SmolLM2, once ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_chat_over_http(smollm2):
    _, _, directory = smollm2
    real = kvtrt.load(directory)
    try:
        with ServerThread(create_app(real, served_model_name="smollm2"), host=HOST) as srv:
            api = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=300)
            messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
            ref = real.generate(messages, max_new_tokens=24)
            answer = api.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0)
            assert answer.choices[0].message.content == ref.text and "Paris" in ref.text
            assert answer.usage.prompt_tokens == len(ref.prompt_ids)
            streamed = api.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0,
                                                   stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in streamed) == ref.text
            stop = api.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0,
                                               stop=["Paris"])
            assert stop.choices[0].finish_reason == "stop" and "Paris" not in stop.choices[0].message.content
    finally:
        real.close()
