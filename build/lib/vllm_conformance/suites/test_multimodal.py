"""Multimodal limits: ``--limit-mm-per-prompt`` is honoured exactly.

The entry's ``serve.limit_mm_per_prompt`` (JSON form, e.g. ``{"image": 2}``) is both the
flag and the expectation: a chat request with N images is served, one with N+1 is refused
with a 400 and an OpenAI-style error body, and the server keeps serving afterwards. Entries
without an image limit skip at once, before any server starts.

Images are tiny generated PNGs sent as ``data:`` URLs, so nothing is downloaded; the ChartQA
test sends the shipped fixture charts through lm-eval.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
from typing import Any

import pytest

from vllm_conformance.client import accuracy, fuzz
from vllm_conformance.fixtures.recorder import Recorder
from vllm_conformance.launch.endpoint import Endpoint
from vllm_conformance.matrix import AccuracyExpect, Deployment
from vllm_conformance.perf.server_metrics import scrape_metrics


def _image_limit(deployment: Deployment) -> int | None:
    return (deployment.serve.limit_mm_per_prompt or {}).get("image")


@pytest.fixture
def mm_endpoint(deployment: Deployment, request: pytest.FixtureRequest) -> Endpoint:
    """The endpoint of an entry with an image limit; other entries skip (no server)."""
    if _image_limit(deployment) is None:
        pytest.skip(f"{deployment.id} sets no serve.limit_mm_per_prompt image limit")
    endpoint: Endpoint = request.getfixturevalue("endpoint")
    return endpoint


def png_data_url(index: int, size: int = 24) -> str:
    """A small solid-colour PNG (a different colour per ``index``) as a data URL."""
    from PIL import Image

    colour = ((index * 67) % 256, (index * 131) % 256, (index * 199) % 256)
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_with_images(endpoint: Endpoint, count: int) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) of a chat request carrying ``count`` images."""
    content: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": png_data_url(i)}} for i in range(count)
    ]
    content.append({"type": "text", "text": "What do you see?"})
    body = {
        "model": endpoint.model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 2,
        "temperature": 0,
    }
    with endpoint.http(120) as http:
        response = http.post("/v1/chat/completions", json=body)
    try:
        data = response.json()
    except ValueError:
        data = {"raw": response.text[:500]}
    return response.status_code, data


def test_images_up_to_the_limit_are_served(
    mm_endpoint: Endpoint, deployment: Deployment, recorder: Recorder
) -> None:
    """1..N images are served (200, a well-formed answer), and images cost prompt tokens."""
    limit = _image_limit(deployment)
    assert limit is not None
    counts = sorted({0, 1, limit})
    statuses: dict[int, int] = {}
    prompt_tokens: dict[int, int | None] = {}
    for count in counts:
        status, data = chat_with_images(mm_endpoint, count)
        statuses[count] = status
        prompt_tokens[count] = (data.get("usage") or {}).get("prompt_tokens")
    grows = all(
        (prompt_tokens[a] or 0) < (prompt_tokens[b] or 0) for a, b in itertools.pairwise(counts)
    )
    ok = all(s == 200 for s in statuses.values()) and grows
    recorder.record(
        "multimodal.images_within_limit",
        "pass" if ok else "fail",
        request={"images": counts},
        status=statuses,
        measured={"prompt_tokens": prompt_tokens},
        expected={"status": 200, "limit": limit},
        source="matrix: serve.limit_mm_per_prompt",
    )
    assert all(s == 200 for s in statuses.values()), f"images within the limit refused: {statuses}"
    assert grows, f"images add no prompt tokens (ignored?): {prompt_tokens}"


def test_one_image_over_the_limit_is_400(
    mm_endpoint: Endpoint, deployment: Deployment, recorder: Recorder
) -> None:
    """N+1 images: 400 with an OpenAI-style error; the server then still serves N images."""
    limit = _image_limit(deployment)
    assert limit is not None
    status, data = chat_with_images(mm_endpoint, limit + 1)
    problem, error = fuzz.check_error_body(status, json.dumps(data))
    after, _ = chat_with_images(mm_endpoint, limit)
    mm_endpoint.probe()
    recorder.record(
        "multimodal.images_over_limit",
        "pass" if status == 400 and not problem and after == 200 else "fail",
        request={"images": limit + 1},
        status=status,
        error=error,
        measured={"status_after_with_limit": after},
        expected={"status": 400, "limit": limit},
        source="matrix: serve.limit_mm_per_prompt",
    )
    assert status == 400, f"{limit + 1} images (limit {limit}) answered {status}: {data}"
    assert not problem, problem
    assert after == 200, f"after the refusal, {limit} images answered {after}"


def test_chartqa_through_lm_eval_sends_the_images(
    mm_endpoint: Endpoint, recorder: Recorder
) -> None:
    """lm-eval's ChartQA task, on the shipped fixture charts through local-chat-completions,
    reaches the server with one image per document, and every document is answered.

    The score is recorded, not judged: this entry's weights are random. What a GPU entry's
    ChartQA expectation relies on (images in the request, offline data) is what is checked.
    """
    # An expectation as an entry would write it; no verdict is drawn from it here.
    task = AccuracyExpect(
        task="chartqa", metric="relaxed_accuracy,none", against="reference",
        api="chat-completions", apply_chat_template=True, data="fixture",
        source="project: self-made ChartQA-format fixture",
    )  # fmt: skip
    before = scrape_metrics(mm_endpoint.base_url).counters
    result = accuracy.run_lm_eval(
        mm_endpoint.base_url,
        mm_endpoint.model,
        task,
        api_key=mm_endpoint.api_key,
        gen_kwargs={"max_gen_toks": 16},
    )
    after = scrape_metrics(mm_endpoint.base_url).counters
    # pyarrow comes with lm-eval's datasets (the accuracy extra), which only this test needs.
    import pyarrow.parquet

    files = accuracy.find_split_files(accuracy.resolve_data("chartqa", "fixture"), "test")
    docs = sum(pyarrow.parquet.read_metadata(f).num_rows for f in files)
    images = after.get("vllm:mm_cache_queries", 0.0) - before.get("vllm:mm_cache_queries", 0.0)
    recorder.record(
        "multimodal.chartqa_lm_eval",
        "pass" if images >= result.n == docs > 0 else "fail",
        measured={"documents": result.n, "images_seen_by_server": images,
                  "relaxed_accuracy": result.value},
        expected={"images_per_document": 1},
        source="lm-eval chartqa task (local-chat-completions) on the shipped fixture",
    )  # fmt: skip
    assert docs > 0 and result.n == docs, f"lm-eval scored {result.n} of {docs} documents"
    assert images >= result.n, (
        f"lm-eval answered {result.n} ChartQA documents but the server processed "
        f"{images:g} images (vllm:mm_cache_queries): the images were not sent"
    )
