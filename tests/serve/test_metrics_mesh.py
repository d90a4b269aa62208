"""Prometheus metrics of ``meshnode serve`` and of its workers, read with prometheus_client's
parser over HTTP, move when requests go through the mesh."""

from __future__ import annotations

import pytest

from tests.serve.conftest import API_KEY, MODEL_NAME
from tests.serve.serve_helpers import metrics_url, scrape

pytestmark = pytest.mark.slow


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_server_metrics_move_after_requests(openai_client, api_server):
    """When a chat completion and a streamed one are answered and a bad one refused, then
    requests by status, tokens in and out, time to first token and per token all move, and
    no stream stays open."""
    before = scrape(api_server.url + "/metrics", API_KEY)
    messages = [{"role": "user", "content": "count"}]
    whole = openai_client.chat.completions.create(model=MODEL_NAME, messages=messages,
                                                  temperature=0, max_tokens=8)
    list(openai_client.chat.completions.create(model=MODEL_NAME, messages=messages,
                                               temperature=0, max_tokens=8, stream=True))
    with pytest.raises(Exception, match="temperature"):
        openai_client.chat.completions.create(model=MODEL_NAME, messages=messages,
                                              temperature=9)
    after = scrape(api_server.url + "/metrics", API_KEY)
    requests = "meshnode_api_requests_total"
    assert delta(before, after, requests, endpoint="chat.completions", status="200") == 2
    assert delta(before, after, requests, endpoint="chat.completions", status="400") == 1
    assert delta(before, after, "meshnode_api_prompt_tokens_total") == \
        2 * whole.usage.prompt_tokens
    assert delta(before, after, "meshnode_api_completion_tokens_total") == \
        2 * whole.usage.completion_tokens
    ttft = "meshnode_api_time_to_first_token_seconds_count"
    assert delta(before, after, ttft) == 2
    per_token = "meshnode_api_time_per_output_token_seconds_count"
    assert delta(before, after, per_token) == 2 * (whole.usage.completion_tokens - 1)
    assert after[("meshnode_api_open_streams", ())] == 0


def test_worker_metrics_move_after_requests(openai_client, api_mesh):
    """When a completion goes through the two workers, then each one's steps and tokens
    grow, its compute time and queue wait are observed, and no session stays open."""
    urls = [metrics_url(node) for node in api_mesh.workers()]
    before = [scrape(url) for url in urls]
    answer = openai_client.completions.create(model=MODEL_NAME, prompt="abc", temperature=0,
                                              max_tokens=6)
    after = [scrape(url) for url in urls]
    steps = answer.usage.completion_tokens  # a prefill, then one step per token but the last
    for b, a in zip(before, after, strict=True):
        assert delta(b, a, "meshnode_worker_steps_total") == steps
        assert delta(b, a, "meshnode_worker_tokens_total") == \
            answer.usage.prompt_tokens + steps - 1
        assert delta(b, a, "meshnode_worker_compute_seconds_count") == steps
        assert delta(b, a, "meshnode_worker_queue_wait_seconds_count") >= steps
        assert delta(b, a, "meshnode_worker_batch_size_sum") == steps
        assert a[("meshnode_worker_sessions", ())] == 0
        assert a[("meshnode_worker_cache_tokens_used", ())] == 0
        assert a[("meshnode_worker_cache_tokens_free", ())] > 0
