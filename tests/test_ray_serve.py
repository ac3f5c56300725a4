"""Ray Serve scale-out: two replicas of the kvtrt app (one scheduler each) on a local Ray instance
started here (2 CPUs, loopback, no dashboard) answer the `openai` client through Ray Serve's HTTP
proxy; a replica killed during the test is replaced and the service keeps answering.
One Ray instance for the whole module (starting Ray takes ~20 s)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

for _module in ("fastapi", "uvicorn", "prometheus_client", "httpx", "openai"):
    pytest.importorskip(_module, reason="the serve extra is not installed: pip install 'kvtrt[serve,test]'")
ray = pytest.importorskip("ray", reason="Ray Serve is not installed: pip install 'kvtrt[ray]'")
pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'kvtrt[ray]'")

import httpx  # noqa: E402
import openai  # noqa: E402
from ray import serve  # noqa: E402

import kvtrt  # noqa: E402
from kvtrt.serve.server import free_port  # noqa: E402

HOST = "127.0.0.1"
PROMPTS = [f"ray prompt {i}: " + "abc " * i for i in range(8)]


@pytest.fixture(scope="module")
def reference(tiny_llama):
    llm = kvtrt.load(tiny_llama[2])
    texts = {p: llm.generate(p, max_new_tokens=12).text for p in PROMPTS}
    llm.close()
    return texts


@pytest.fixture(scope="module")
def ray_service(tiny_llama):
    from kvtrt.serve.ray_app import build_app

    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address=HOST, log_to_driver=False)
    try:
        serve.start(http_options={"host": HOST, "port": port})
        serve.run(build_app({"directory": str(tiny_llama[2]), "replicas": 2, "num_cpus": 0.5, "threads": 1,
                             "served_model_name": "tiny"}), name="kvtrt", route_prefix="/")
        yield f"http://{HOST}:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def replica_actors() -> list[dict]:
    return sorted((a for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]),
                  key=lambda a: a["name"])


def running_replicas() -> int:
    status = serve.status().applications["kvtrt"].deployments["kvtrt"]
    return status.replica_states.get("RUNNING", 0)


def ask(url: str, prompt: str, retries: int = 0) -> str:
    api = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=retries, timeout=120)
    return api.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0).choices[0].text


def test_two_replicas_answer_the_openai_client(ray_service, reference):
    assert running_replicas() == 2 and len(replica_actors()) == 2
    api = openai.OpenAI(base_url=ray_service + "/v1", api_key="x", max_retries=0, timeout=120)
    assert [m.id for m in api.models.list().data] == ["tiny"]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda p: ask(ray_service, p), PROMPTS * 2))
    assert answers == [reference[p] for p in PROMPTS * 2]
    streamed = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                           temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    bad = httpx.post(ray_service + "/v1/completions", json={"model": "tiny", "prompt": "x", "n": 2}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "n"
    assert "kvtrt:num_requests_running" in httpx.get(ray_service + "/metrics", timeout=60).text


def test_killed_replica_is_replaced_and_service_keeps_answering(ray_service, reference):
    before = replica_actors()
    assert len(before) == 2
    victim = before[0]
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    # the service keeps answering while Serve notices and replaces the replica (the client's
    # retries absorb a request that was in flight on the killed replica)
    deadline = time.monotonic() + 120
    answered = 0
    replaced = False
    while time.monotonic() < deadline:
        prompt = PROMPTS[answered % len(PROMPTS)]
        assert ask(ray_service, prompt, retries=3) == reference[prompt]
        answered += 1
        now = replica_actors()
        if len(now) == 2 and victim["name"] not in {a["name"] for a in now} and running_replicas() == 2:
            replaced = True
            break
        time.sleep(0.2)
    assert replaced, f"the killed replica was not replaced within 120 s (replicas: {replica_actors()})"
    assert answered >= 1
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda p: ask(ray_service, p), PROMPTS))
    assert answers == [reference[p] for p in PROMPTS]
