"""`specdec serve --replicas 2`: engine replicas behind Ray Serve's proxy, driven by the official openai client on
127.0.0.1 over the tiny float64 model, every answer checked against single-process generate; a replica killed
by its PID mid-run; SIGTERM. One server for the module (Ray's start costs ~20 s on 2 cores)."""

import os
import re
import signal
import threading
import time

import httpx
import openai
import pytest
from test_server import TOKENIZER, _start_serve, _tiny_folder, greedy, text_of

pytest.importorskip("ray.serve", reason="Ray Serve is the [serve] extra (the [test] extra brings it)")

MAX_TOKENS = 24
LONG = 200  # tokens of each request running while a replica is killed


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    folder = _tiny_folder(tmp_path_factory.mktemp("replicas"))
    proc, url, lines = _start_serve(folder, "--replicas", "2", "--draft", "ngram", start_timeout=180)
    yield proc, url, lines, str(folder)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _processes(url: str) -> dict[str, int]:
    """replica name -> PID, from the aggregated /metrics."""
    text = httpx.get(url + "/metrics", timeout=30).text
    return {m[1]: int(m[0]) for m in re.findall(r'specdec_replica_info\{pid="(\d+)",replica="(\w+)"\}', text)}


def _running(url: str, replica: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    return float(re.search(rf'specdec_requests_running\{{replica="{replica}"\}} ([\d.]+)', text)[1])


def _ask(url: str, model: str, prompt: str, stream: bool, max_tokens: int = MAX_TOKENS) -> tuple[str, str]:
    """(the replica that answered, the text) of a greedy completion."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    if stream:
        with client.completions.with_streaming_response.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                                               temperature=0, stream=True) as response:
            text = "".join(c.choices[0].text for c in response.parse() if c.choices)
            return response.headers["x-specdec-replica"], text
    response = client.completions.with_raw_response.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                                           temperature=0)
    return response.headers["x-specdec-replica"], response.parse().choices[0].text


def _concurrently(calls, during=None) -> list:
    """Each call's result, or the exception it raised; all started at once, then ``during()`` runs."""
    results = [None] * len(calls)

    def run(i):
        try:
            results[i] = calls[i]()
        except Exception as err:  # noqa: BLE001 - reported to the test
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    if during is not None:
        during()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a request hung"
    return results


PROMPTS = ["abcabcabc", "Hello there", "x", "the cat the cat", "zzz", "0123", "Ok.", "q"]


def test_replicas_answer_as_one_process_and_both_serve(replicas):
    """Concurrent greedy requests, streamed and whole: every answer equals single-process generate, both
    replicas answered some (the x-specdec-replica header), and /metrics holds both replicas' counters."""
    _, url, _, model = replicas
    seen = set()
    for _ in range(5):  # (routing is by load: rounds until both replicas have answered)
        results = _concurrently([lambda p=p, i=i: _ask(url, model, p, stream=i % 2 == 1)
                                 for i, p in enumerate(PROMPTS)])
        for prompt, (replica, text) in zip(PROMPTS, results):
            assert text == text_of(greedy(TOKENIZER(prompt)["input_ids"], MAX_TOKENS)), prompt
            seen.add(replica)
        if len(seen) == 2:
            break
    assert seen == set(_processes(url)) and len(seen) == 2
    text = httpx.get(url + "/metrics", timeout=30).text
    for name in seen:
        tokens = re.search(rf'specdec_generation_tokens_total\{{replica="{name}"\}} ([\d.]+)', text)
        assert tokens and float(tokens[1]) > 0, text


def test_a_killed_replica_fails_only_its_requests_and_comes_back(replicas):
    """Kill one replica's process by its PID while requests run: requests on the other complete exactly,
    those on the dead one end with a 5xx (never hang), and Ray Serve starts a new replica."""
    _, url, _, model = replicas
    before = _processes(url)
    victim, pid = sorted(before.items())[0]

    def kill_while_it_runs():
        deadline = time.time() + 60
        while _running(url, victim) == 0:
            assert time.time() < deadline, "the requests never ran on " + victim
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)

    results = _concurrently([lambda p=p: _ask(url, model, p, stream=False, max_tokens=LONG) for p in PROMPTS],
                            during=kill_while_it_runs)
    for prompt, result in zip(PROMPTS, results):
        if isinstance(result, Exception):
            assert isinstance(result, openai.APIStatusError) and result.status_code >= 500, repr(result)
        else:
            assert result[1] == text_of(greedy(TOKENIZER(prompt)["input_ids"], LONG))
    assert any(isinstance(r, Exception) for r in results)
    assert any(not isinstance(r, Exception) and r[0] != victim for r in results)
    deadline = time.time() + 90
    while True:
        now = _processes(url)
        if len(now) == 2 and victim not in now:
            break
        assert time.time() < deadline, f"no replica replaced {victim}: {now}"
        time.sleep(1)
    replica, text = _ask(url, model, "abc", stream=True)
    assert text == text_of(greedy(TOKENIZER("abc")["input_ids"], MAX_TOKENS))


def test_sigterm_shuts_the_replicas_down_and_exits_0(replicas):
    proc, url, lines, _ = replicas
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=90) == 0, "".join(lines[-30:])
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=2)


def test_the_application_for_a_ray_cluster_of_your_own():
    """`serve run specdec.server.replicas:app_builder model=... num_replicas=2`: its settings as text, an unknown
    one refused by name."""
    from ray.serve import Application

    from specdec.server.replicas import app_builder

    app = app_builder({"model": "some-model", "num_replicas": "2", "draft": "ngram", "num_draft_tokens": "3"})
    assert isinstance(app, Application)
    with pytest.raises(ValueError, match="replica_count"):
        app_builder({"model": "some-model", "replica_count": "2"})
