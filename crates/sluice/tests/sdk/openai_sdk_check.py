"""Drive a running Sluice with the official OpenAI Python SDK.

Run by tests/openai_sdk.rs with SLUICE_URL (the gateway's /v1 base URL) and
SLUICE_KEY (its master key) set. Each check prints one line; the last line is
"N passed, N failed" and the exit status is non-zero when anything failed.
"""

import os
import sys
import traceback

import openai
from openai import OpenAI

BASE = os.environ["SLUICE_URL"]
KEY = os.environ["SLUICE_KEY"]
client = OpenAI(base_url=BASE, api_key=KEY, max_retries=0, timeout=20)
CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


@check
def chat():
    r = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        user="sdk-user",
        extra_headers={"x-sluice-feature": "sdk-test"},
    )
    assert r.headers.get("x-sluice-request-id", "").startswith("req_"), r.headers
    assert r.headers.get("x-sluice-model") == "gpt-4o-mini", r.headers
    c = r.parse()
    assert c.object == "chat.completion"
    assert c.choices[0].message.role == "assistant"
    assert c.choices[0].message.content.startswith("Simulated"), c.choices[0].message.content
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens > 0


@check
def chat_is_deterministic_and_extra_body_is_accepted():
    args = dict(model="gpt-4o-mini", messages=[{"role": "user", "content": "same input"}])
    a = client.chat.completions.create(**args)
    b = client.chat.completions.create(**args, extra_body={"sluice": {"feature": "x"}, "seed": 1})
    assert a.choices[0].message.content == b.choices[0].message.content


@check
def stream_with_usage():
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Stream please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, chunks = "", None, 0
    for chunk in stream:
        chunks += 1
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert chunks > 3, chunks
    assert text.startswith("Simulated"), text
    assert usage is not None and usage.completion_tokens > 0, usage
    whole = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Stream please"}])
    assert whole.choices[0].message.content == text


@check
def stream_without_usage_has_no_usage_chunk():
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], stream=True
    )
    assert all(c.usage is None and c.choices for c in stream)


@check
def embeddings():
    one = client.embeddings.create(model="text-embedding-3-small", input="hello")
    assert len(one.data) == 1 and len(one.data[0].embedding) == 1536
    many = client.embeddings.create(model="text-embedding-3-small", input=["a", "b", "hello"])
    assert [d.index for d in many.data] == [0, 1, 2]
    assert many.data[2].embedding == one.data[0].embedding
    assert many.usage.prompt_tokens > 0


@check
def models_list():
    ids = {m.id for m in client.models.list()}
    assert {"gpt-4o-mini", "text-embedding-3-small", "limited"} <= ids, ids


@check
def bad_request_is_400():
    try:
        client.chat.completions.create(model="gpt-4o-mini", messages=[])
    except openai.BadRequestError as e:
        assert e.status_code == 400
        assert e.body["code"] == "invalid_request", e.body
        assert e.body["param"] == "messages", e.body
    else:
        raise AssertionError("no BadRequestError")


@check
def unknown_model_is_404():
    try:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    except openai.NotFoundError as e:
        assert e.body["code"] == "model_not_found", e.body
    else:
        raise AssertionError("no NotFoundError")


@check
def wrong_key_is_401():
    bad = OpenAI(base_url=BASE, api_key="wrong", max_retries=0)
    try:
        bad.models.list()
    except openai.AuthenticationError as e:
        assert e.status_code == 401
    else:
        raise AssertionError("no AuthenticationError")


@check
def upstream_rate_limit_is_429_with_retry_after():
    try:
        client.chat.completions.create(model="limited", messages=[{"role": "user", "content": "x"}])
    except openai.RateLimitError as e:
        assert e.status_code == 429
        assert int(e.response.headers["retry-after"]) >= 1, e.response.headers
    else:
        raise AssertionError("no RateLimitError")


passed = failed = 0
for fn in CHECKS:
    try:
        fn()
        passed += 1
        print(f"ok {fn.__name__}")
    except Exception:
        failed += 1
        print(f"FAILED {fn.__name__}")
        traceback.print_exc()
print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
