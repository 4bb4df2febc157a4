"""Hypothesis strategies for bad requests to vLLM's OpenAI endpoints, and their checks.

A strategy draws a :class:`FuzzCase`: one request to ``/v1/completions`` or
``/v1/chat/completions`` that is bad in one way (its ``kind``): malformed JSON, a wrong type,
a missing field, a number out of range, an empty prompt, a lone surrogate, bytes that are not
UTF-8, an unknown model, a huge stop list or an oversize body. Every strategy takes
``stream``: vLLM validates some fields only after a stream has started, so each class is
drawn both ways. Some draws are valid requests (an empty stop list, a whitespace prompt);
the property the suites check is the same for all:

    the answer is a 4xx with an OpenAI-style error body, or a 200 with a well-formed
    answer (a stream without an error event); never a 5xx, never a hang; and a request
    that the OpenAI API itself rejects (``FuzzCase.invalid``: ``temperature: -1``,
    ``top_p: 2``, ``n: 0``, ...) gets a 4xx, not a 200.

Every valid request a strategy can draw is cheap (at most a few output tokens, a handful of
sequences), so a 200 answer comes quickly and a hang is a finding, not a slow example. Large
bodies are described by a ``pad`` (field, text, count) rather than drawn by hypothesis, so
examples stay small and shrink well; :meth:`FuzzCase.render` builds the exact bytes, and
:meth:`FuzzCase.to_record` / :meth:`FuzzCase.from_record` round-trip a case through a run
report so a failure can be replayed::

    case = FuzzCase.from_record(record["request"])
    httpx.post(base_url + case.path, content=case.render(), headers=case.headers())
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from hypothesis import strategies as st

from vllm_conformance.client import sse

Api = Literal["completions", "chat"]

PATHS: dict[str, str] = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}

#: The bad-input classes, in the order reports list them.
KINDS: tuple[str, ...] = (
    "malformed_json",
    "wrong_type",
    "missing_field",
    "out_of_range",
    "empty_prompt",
    "lone_surrogate",
    "invalid_utf8",
    "unknown_model",
    "huge_stop",
    "oversize",
)

#: Bodies at most this long are recorded verbatim; longer ones by their recipe.
RECORD_VERBATIM_BYTES = 65_536

_INT64 = 2**63


@dataclass(frozen=True)
class Target:
    """What the strategies need to know about the deployment under test."""

    model: str
    max_model_len: int
    vocab_size: int | None = None


@dataclass(frozen=True)
class FuzzCase:
    """One request: a JSON body (optionally padded) or raw bytes, to one endpoint."""

    api: Api
    kind: str
    body: Any = None
    raw: bytes | None = None
    pad: Mapping[str, Any] | None = None
    content_type: str | None = "application/json"
    note: str = ""
    #: the OpenAI API rejects this request (a value outside a documented range): a 200 is
    #: a finding, not a valid answer
    invalid: bool = False

    @property
    def path(self) -> str:
        return PATHS[self.api]

    @property
    def stream(self) -> bool:
        return isinstance(self.body, dict) and self.body.get("stream") is True

    def headers(self) -> dict[str, str]:
        return {"Content-Type": self.content_type} if self.content_type else {}

    def render(self) -> bytes:
        """The exact request body."""
        if self.raw is not None:
            return self.raw
        body = self.body
        if self.pad:
            body = _apply_pad(body, self.pad)
        # ensure_ascii keeps lone surrogates as \\ud800 escapes (valid JSON syntax).
        return json.dumps(body, ensure_ascii=True, allow_nan=True).encode()

    def summary(self, head: int = 300) -> dict[str, Any]:
        """A short description for reports (not enough to replay: see :meth:`to_record`)."""
        data = self.render()
        return {
            "path": self.path,
            "kind": self.kind,
            "note": self.note,
            "bytes": len(data),
            "body_head": data[:head].decode("utf-8", errors="backslashreplace"),
        }

    def to_record(self) -> dict[str, Any]:
        """A JSON-able description from which :meth:`from_record` rebuilds the same bytes."""
        data = self.render()
        rec: dict[str, Any] = {
            "method": "POST",
            "path": self.path,
            "api": self.api,
            "kind": self.kind,
            "content_type": self.content_type,
            "bytes": len(data),
            "note": self.note,
            "invalid": self.invalid,
        }
        if self.raw is not None:
            rec["raw_b64"] = base64.b64encode(self.raw).decode()
            rec["raw_repr"] = repr(self.raw[:300])
        else:
            rec["body"] = _jsonable(self.body)
            if self.pad:
                rec["pad"] = dict(self.pad)
        if len(data) <= RECORD_VERBATIM_BYTES:
            rec["body_text"] = data.decode("utf-8", errors="backslashreplace")
        return rec

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> FuzzCase:
        """The case a :meth:`to_record` dict describes (for replaying a failure)."""
        raw = base64.b64decode(rec["raw_b64"]) if "raw_b64" in rec else None
        return cls(
            api=rec["api"],
            kind=rec["kind"],
            body=_from_jsonable(rec.get("body")),
            raw=raw,
            pad=rec.get("pad"),
            content_type=rec.get("content_type"),
            note=rec.get("note", ""),
            invalid=bool(rec.get("invalid", False)),
        )


# Non-finite floats are not JSON: reports store them as tagged strings.
_FLOAT_TAGS = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return {"$float": "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _from_jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$float"}:
            return _FLOAT_TAGS[value["$float"]]
        return {k: _from_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_jsonable(v) for v in value]
    return value


def _apply_pad(body: Any, pad: Mapping[str, Any]) -> Any:
    """Put ``pad["text"] * pad["count"]`` (or a list of ``count`` copies) at ``pad["path"]``."""
    body = json.loads(json.dumps(body))
    unit = pad["text"]
    value: Any = [unit] * pad["count"] if pad.get("as_list") else unit * pad["count"]
    target = body
    keys = pad["path"]
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value
    return body


# -- building blocks ----------------------------------------------------------------------

_WORDS = ("the", "model", "token", "cache", "answer", "hello", "stream", "batch", "layer")
short_text = st.lists(st.sampled_from(_WORDS), min_size=1, max_size=4).map(" ".join)
small_max_tokens = st.integers(1, 3)


def base_request(
    api: Api, target: Target, stream: bool = False
) -> st.SearchStrategy[dict[str, Any]]:
    """A valid, cheap request: a few words in, at most 3 tokens out, greedy; streamed or
    not (validation that happens after the stream started shows only in streams)."""
    if api == "completions":
        prompt: st.SearchStrategy[dict[str, Any]] = st.fixed_dictionaries({"prompt": short_text})
    else:
        prompt = st.fixed_dictionaries(
            {"messages": st.builds(lambda t: [{"role": "user", "content": t}], short_text)}
        )
    common = st.fixed_dictionaries(
        {
            "model": st.just(target.model),
            "max_tokens": small_max_tokens,
            "temperature": st.just(0),
            "stream": st.just(stream),
        }
    )
    return st.tuples(common, prompt).map(lambda parts: {**parts[0], **parts[1]})


def _case(api: Api, kind: str, **kw: Any) -> FuzzCase:
    return FuzzCase(api=api, kind=kind, **kw)


def _prompt_key(api: Api) -> str:
    return "prompt" if api == "completions" else "messages"


# -- the bad-input classes ----------------------------------------------------------------


def malformed_json(api: Api, target: Target, stream: bool = False) -> st.SearchStrategy[FuzzCase]:
    """Bodies that are not the JSON object the endpoint expects."""

    def truncated(body: dict[str, Any], cut: float) -> FuzzCase:
        text = json.dumps(body).encode()
        n = max(1, int(len(text) * cut))
        return _case(api, "malformed_json", raw=text[:n], note=f"first {n} of {len(text)} bytes")

    fixed = st.sampled_from(
        [
            b"",
            b"{",
            b"}",
            b"{]",
            b"null",
            b"[]",
            b"42",
            b'"a string"',
            b"{'model': 'x', 'prompt': 'single quotes'}",
            b'{"prompt": "trailing comma",}',
            b'{"prompt": "x" "y"}',
            b'{"max_tokens": 01}',
            b'{"prompt": "unterminated',
            b"\x00\x00\x00",
            b"not json at all",
            b'{"a": 1} {"b": 2}',
        ]
    ).map(lambda raw: _case(api, "malformed_json", raw=raw))
    deep = st.sampled_from([64, 1_000, 100_000]).map(
        lambda depth: _case(
            api,
            "malformed_json",
            raw=b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}",
            note=f"arrays nested {depth} deep",
        )
    )

    def wrong_content_type(body: dict[str, Any], ctype: str | None) -> FuzzCase:
        return _case(
            api,
            "malformed_json",
            raw=json.dumps(body).encode(),
            content_type=ctype,
            note=f"valid JSON sent as {ctype}",
        )

    ctype = st.builds(
        wrong_content_type,
        base_request(api, target, stream),
        st.sampled_from(
            [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
        ),
    )
    return st.one_of(
        fixed,
        deep,
        ctype,
        st.builds(truncated, base_request(api, target, stream), st.floats(0.05, 0.95)),
    )


#: Values of the wrong JSON type; numbers that could coerce to a costly valid value are
#: kept small (a numeric string "30000" as max_tokens would be a valid, slow request).
_wrong_values = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(["", "abc", "1.5", "-1", "[]", "{}", "true", "null"]),
    st.floats(-3, 3, allow_nan=False),
    st.just(float("nan")),
    st.just(float("inf")),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.sampled_from(["a", "type", "text"]), st.integers(0, 3), max_size=2),
    st.lists(st.dictionaries(st.just("x"), st.none(), max_size=1), max_size=2),
)

_SCALAR_FIELDS = {
    "completions": (
        "model",
        "prompt",
        "max_tokens",
        "n",
        "temperature",
        "top_p",
        "top_k",
        "logprobs",
        "stop",
        "stream",
        "seed",
        "echo",
        "presence_penalty",
        "frequency_penalty",
        "user",
        "stream_options",
        "logit_bias",
        "suffix",
        "min_tokens",
        "stop_token_ids",
        "response_format",
        "priority",
    ),
    "chat": (
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "n",
        "temperature",
        "top_p",
        "top_k",
        "logprobs",
        "top_logprobs",
        "stop",
        "stream",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "user",
        "stream_options",
        "logit_bias",
        "tools",
        "tool_choice",
        "response_format",
        "chat_template_kwargs",
        "min_tokens",
    ),
}

#: Fields where some "wrong" values are valid and expensive: only clearly-invalid values.
_COSTLY = {"max_tokens", "max_completion_tokens", "n", "min_tokens"}
_costly_values = st.one_of(
    st.sampled_from(["abc", "", "1e9", "3.5", [], {}, [1], {"a": 1}, True]),
    st.floats(-3, 3, allow_nan=False).filter(lambda x: x != int(x)),
    st.just(float("nan")),
    st.just(float("inf")),
)


def wrong_type(api: Api, target: Target, stream: bool = False) -> st.SearchStrategy[FuzzCase]:
    """One field set to a value of another type (or a broken message structure)."""

    def put(body: dict[str, Any], name: str, value: Any) -> FuzzCase:
        if name in _COSTLY and value is None:
            value = "abc"  # null max_tokens means "up to max_model_len" for chat
        if name == "min_tokens" and isinstance(value, bool):
            value = "abc"
        return _case(api, "wrong_type", body={**body, name: value}, note=name)

    def pair(name: str) -> st.SearchStrategy[tuple[str, Any]]:
        values = _costly_values if name in _COSTLY else _wrong_values
        return st.tuples(st.just(name), values)

    field_value = st.sampled_from(_SCALAR_FIELDS[api]).flatmap(pair)
    simple = st.builds(lambda b, fv: put(b, *fv), base_request(api, target, stream), field_value)
    if api == "completions":
        vocab = target.vocab_size or 4096
        token_ids = st.one_of(
            st.lists(st.integers(vocab, 2**40), min_size=1, max_size=3),
            st.lists(st.integers(-(2**40), -1), min_size=1, max_size=3),
            st.lists(st.sampled_from([_INT64, -_INT64 - 1, 2**64]), min_size=1, max_size=2),
            st.just([]),
            st.just([[]]),
            st.lists(st.lists(st.integers(vocab, 2**31), min_size=1, max_size=2), max_size=2),
            st.lists(st.integers(0, vocab - 1), min_size=1, max_size=4),  # valid ids
        )
        ids = st.builds(
            lambda b, p: _case(api, "wrong_type", body={**b, "prompt": p}, note="token ids"),
            base_request(api, target, stream),
            token_ids,
        )
        return st.one_of(simple, ids)
    messages = st.sampled_from(
        [
            [{"role": "user"}],
            [{"content": "no role"}],
            [{"role": "nobody", "content": "x"}],
            [{"role": "user", "content": 5}],
            [{"role": "user", "content": [{"type": "nonsense", "text": "x"}]}],
            [{"role": "user", "content": [{"type": "text"}]}],
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            [{"role": "user", "content": [{"type": "image_url", "image_url": "nope"}]}],
            [{"role": "tool", "content": "x"}],
            [{"role": "assistant", "content": None}],
            ["just a string"],
            [None],
            [[]],
        ]
    )
    broken = st.builds(
        lambda b, m: _case(api, "wrong_type", body={**b, "messages": m}, note="messages"),
        base_request(api, target, stream),
        messages,
    )
    return st.one_of(simple, broken)


def missing_field(api: Api, target: Target, stream: bool = False) -> st.SearchStrategy[FuzzCase]:
    """A field left out (chat keeps ``max_tokens``: without it chat fills the context)."""
    droppable = ["model", _prompt_key(api), "temperature"]
    if api == "completions":
        droppable.append("max_tokens")  # completions default to 16 tokens

    def drop(body: dict[str, Any], name: str) -> FuzzCase:
        return _case(
            api, "missing_field", body={k: v for k, v in body.items() if k != name}, note=name
        )

    dropped = st.builds(drop, base_request(api, target, stream), st.sampled_from(droppable))
    only = st.builds(
        lambda b, key: _case(api, "missing_field", body={key: b[key]}, note=f"only {key}"),
        base_request(api, target, stream),
        st.sampled_from(["model", "max_tokens"]),
    )
    return st.one_of(dropped, only, st.just(_case(api, "missing_field", body={}, note="{}")))


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _outside(low: float, high: float) -> Callable[[Any], bool]:
    return lambda x: not _finite(x) or not low <= x <= high


#: Values the OpenAI API rejects, by parameter (its documented ranges; where vLLM documents
#: a wider one, only what both reject). Parameters of vLLM's own (top_k, min_p, ...) are
#: fuzzed but not judged by these.
OPENAI_INVALID: dict[str, Callable[[Any], bool]] = {
    "max_tokens": lambda x: x < 1,
    "max_completion_tokens": lambda x: x < 1,
    "n": lambda x: x < 1,
    "best_of": lambda x: x < 1,
    "temperature": _outside(0, 2),
    "top_p": _outside(0, 1),
    "presence_penalty": _outside(-2, 2),
    "frequency_penalty": _outside(-2, 2),
    "top_logprobs": _outside(0, 20),
    "logprobs": _outside(0, 20),
    "logit_bias": lambda bias: any(
        not k.isdigit() or not _finite(v) or not -100 <= v <= 100 for k, v in bias.items()
    ),
}


def rejected_fields(body: Any) -> list[str]:
    """The fields of a JSON body whose values the OpenAI API rejects (numbers out of range
    and bad logit biases; values of another type are the wrong-type class's business)."""
    if not isinstance(body, dict):
        return []
    out = []
    for name, rejected in OPENAI_INVALID.items():
        value = body.get(name)
        typed = (
            isinstance(value, dict)
            if name == "logit_bias"
            else _finite(value) or (isinstance(value, float))
        )
        if typed and not isinstance(value, bool) and rejected(value):
            out.append(name)
    return out


def out_of_range(api: Api, target: Target, stream: bool = False) -> st.SearchStrategy[FuzzCase]:
    """Numbers outside what the parameter allows (and a few valid edge values); those the
    OpenAI API rejects are marked ``invalid``."""
    mml = target.max_model_len
    ranges: dict[str, list[Any]] = {
        # Above max_model_len only: vLLM 0.32 accepts max_tokens <= max_model_len and clamps
        # it to the room left after the prompt, a valid request that runs for minutes.
        "max_tokens": [0, -1, -(2**31), mml + 1, 10 * mml, 2**31, _INT64, 2**64, 10**30],
        "n": [0, -1, 16_385, 2**31, _INT64, 10**30, 2, 3],
        "temperature": [-1, -1e-9, 2.0001, 3, 1e308, -1e308, float("nan"), float("inf"), 2.0],
        "top_p": [0, -0.1, 1.0001, 2, float("nan"), float("inf"), 1e-9, 1.0],
        "top_k": [-2, -(2**31), 2**40, _INT64, 1, -1],
        "min_p": [-0.1, 1.1, float("nan"), 1.0],
        "presence_penalty": [-2.1, 2.1, 1e9, float("nan"), -2.0, 2.0],
        "frequency_penalty": [-2.1, 2.1, -1e9, float("inf"), 2.0],
        "repetition_penalty": [0, -1, float("nan"), 1e-9, 1e9],
        "seed": [-1, -(2**63), 2**64, 10**30, 0],
        "min_tokens": [-1, 4, mml + 1, 2**31],
        "logit_bias": [{"1": 101}, {"1": -101}, {"-1": 1}, {"99999999": 1}, {"x": 1}],
        "stop_token_ids": [[-1], [2**31], [_INT64]],
    }
    if api == "completions":
        ranges["logprobs"] = [-2, 21, 10**6, _INT64, 20, 0, -1]
        ranges["prompt_logprobs"] = [-2, 21, 10**6, 5]
        ranges["best_of"] = [0, -1, 2**31]
    else:
        ranges["max_completion_tokens"] = [0, -1, mml + 1, 2**31, _INT64]
        ranges["top_logprobs"] = [-2, 21, 10**6, _INT64, 20, 0]
    # chat: top_logprobs needs logprobs=true, so draw both.
    logprobs = st.sampled_from([True, False, None]) if api == "chat" else st.none()

    def put(body: dict[str, Any], item: tuple[str, Any], lp: bool | None) -> FuzzCase:
        name, value = item
        new = {**body, name: value}
        if name == "top_logprobs" and lp is not None:
            new["logprobs"] = lp
        if name == "min_tokens":
            new["max_tokens"] = 1
        invalid = name in rejected_fields(new)
        return _case(api, "out_of_range", body=new, note=name, invalid=invalid)

    item = st.sampled_from(sorted(ranges)).flatmap(
        lambda name: st.tuples(st.just(name), st.sampled_from(ranges[name]))
    )
    return st.builds(put, base_request(api, target, stream), item, logprobs)


_BLANKS = ["", " ", "   ", "\n", "\t\n ", "\u00a0", "\u200b", "\u3000", "\r\n\r\n"]


def empty_prompt(api: Api, target: Target, stream: bool = False) -> st.SearchStrategy[FuzzCase]:
    """Empty and whitespace-only prompts, messages and content parts."""
    blank = st.sampled_from(_BLANKS)
    if api == "completions":
        prompts = st.one_of(
            blank, st.lists(blank, min_size=1, max_size=3), st.just([]), st.just([[]])
        )
        return st.builds(
            lambda b, p: _case(api, "empty_prompt", body={**b, "prompt": p}),
            base_request(api, target, stream),
            prompts,
        )
    messages = st.one_of(
        st.just([]),
        blank.map(lambda t: [{"role": "user", "content": t}]),
        blank.map(lambda t: [{"role": "system", "content": t}]),
        blank.map(lambda t: [{"role": "user", "content": [{"type": "text", "text": t}]}]),
        st.just([{"role": "user", "content": []}]),
    )
    return st.builds(
        lambda b, m: _case(api, "empty_prompt", body={**b, "messages": m}),
        base_request(api, target, stream),
        messages,
    )


_LONE = ["\ud800", "\udfff", "\udc00abc", "abc\ud83d", "\ud83d\ud83d"]
_BAD_BYTES = [b"\xff", b"\xfe\xff", b"\xc3", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]


def lone_surrogate(api: Api, target: Target, stream: bool = False) -> st.SearchStrategy[FuzzCase]:
    """Lone UTF-16 surrogates (``\\ud800`` JSON escapes: valid JSON, invalid Unicode) and
    NUL characters in each string field."""
    fields = (
        ["prompt", "stop", "model", "user", "suffix"]
        if api == "completions"
        else ["content", "stop", "model", "user", "role"]
    )

    def surrogate(body: dict[str, Any], name: str, text: str) -> FuzzCase:
        body = json.loads(json.dumps(body))
        if name == "content":
            body["messages"][0]["content"] = text
        elif name == "role":
            body["messages"][0]["role"] = text
        elif name == "stop" and text.startswith("list:"):
            body["stop"] = ["ok", text[5:]]
        else:
            body[name] = text
        return _case(api, "lone_surrogate", body=body, note=f"{text[:12]!r} in {name}")

    texts = st.sampled_from([*_LONE, "list:\ud800", "nul\u0000inside"])
    return st.builds(surrogate, base_request(api, target, stream), st.sampled_from(fields), texts)


def invalid_utf8(api: Api, target: Target, stream: bool = False) -> st.SearchStrategy[FuzzCase]:
    """Bytes that are not UTF-8 inside a JSON string of the raw body."""

    def bad_bytes(body: dict[str, Any], bad: bytes, nul: bool) -> FuzzCase:
        marker = "XMARKERX"
        body = json.loads(json.dumps(body))
        if api == "completions":
            body["prompt"] = body["prompt"] + marker
        else:
            body["messages"][0]["content"] += marker
        raw = json.dumps(body).encode().replace(marker.encode(), bad + (b"\x00" if nul else b""))
        return _case(api, "invalid_utf8", raw=raw, note=f"{bad!r} inside a string")

    return st.builds(
        bad_bytes, base_request(api, target, stream), st.sampled_from(_BAD_BYTES), st.booleans()
    )


def unknown_model(api: Api, target: Target, stream: bool = False) -> st.SearchStrategy[FuzzCase]:
    """A model name the server does not serve (404 expected)."""
    names = st.one_of(
        st.text(min_size=1, max_size=30),
        st.sampled_from(["gpt-4", "../../etc/passwd", target.model.upper(), target.model + " "]),
    ).filter(lambda n: n != target.model)
    long = st.integers(1_000, 100_000).map(lambda n: "m" * n)
    return st.builds(
        lambda b, name: _case(
            api, "unknown_model", body={**b, "model": name}, note=f"{len(name)} chars"
        ),
        base_request(api, target, stream),
        st.one_of(names, long),
    )


def huge_stop(api: Api, target: Target, stream: bool = False) -> st.SearchStrategy[FuzzCase]:
    """Stop lists far longer than allowed, or one huge stop string."""

    def many(body: dict[str, Any], count: int) -> FuzzCase:
        return _case(
            api,
            "huge_stop",
            body={**body, "stop": []},
            pad={"path": ["stop"], "text": "stop", "count": count, "as_list": True},
            note=f"{count} stop strings",
        )

    def long(body: dict[str, Any], size: int) -> FuzzCase:
        return _case(
            api,
            "huge_stop",
            body={**body, "stop": ""},
            pad={"path": ["stop"], "text": "s", "count": size},
            note=f"stop of {size} chars",
        )

    def ids(body: dict[str, Any], count: int) -> FuzzCase:
        return _case(
            api,
            "huge_stop",
            body={**body, "stop_token_ids": []},
            pad={"path": ["stop_token_ids"], "text": 1, "count": count, "as_list": True},
            note=f"{count} stop token ids",
        )

    valid = st.builds(
        lambda b, s: _case(api, "huge_stop", body={**b, "stop": s}, note="small stop list"),
        base_request(api, target, stream),
        st.lists(short_text, max_size=4),
    )
    base = base_request(api, target, stream)
    return st.one_of(
        st.builds(many, base, st.sampled_from([5, 100, 10_000, 200_000])),
        st.builds(long, base, st.sampled_from([1_000, 100_000, 1_000_000])),
        st.builds(ids, base, st.sampled_from([1_000, 100_000])),
        valid,
    )


def oversize(api: Api, target: Target, stream: bool = False) -> st.SearchStrategy[FuzzCase]:
    """Bodies of megabytes: prompts far past max_model_len, many messages, junk fields."""
    mml = target.max_model_len

    def text(body: dict[str, Any], chars: int) -> FuzzCase:
        path = ["prompt"] if api == "completions" else ["messages", 0, "content"]
        return _case(
            api,
            "oversize",
            body=body,
            pad={"path": path, "text": "model token ", "count": chars // 12},
            note=f"prompt of {chars} chars",
        )

    def token_ids(body: dict[str, Any], factor: int) -> FuzzCase:
        return _case(
            api,
            "oversize",
            body={**body, "prompt": []},
            pad={"path": ["prompt"], "text": 100, "count": mml * factor, "as_list": True},
            note=f"{mml * factor} prompt token ids",
        )

    def messages(body: dict[str, Any], count: int) -> FuzzCase:
        return _case(
            api,
            "oversize",
            body={**body, "messages": []},
            pad={
                "path": ["messages"],
                "text": {"role": "user", "content": "hi"},
                "count": count,
                "as_list": True,
            },
            note=f"{count} messages",
        )

    def junk(body: dict[str, Any], size: int) -> FuzzCase:
        return _case(
            api,
            "oversize",
            body={**body, "junk_field": ""},
            pad={"path": ["junk_field"], "text": "j", "count": size},
            note=f"unknown field of {size} bytes",
        )

    sizes = st.sampled_from([mml * 8, 1_000_000, 4_000_000])
    options = [
        st.builds(text, base_request(api, target, stream), sizes),
        st.builds(junk, base_request(api, target, stream), st.sampled_from([1_000_000, 8_000_000])),
    ]
    if api == "completions":
        options.append(
            st.builds(token_ids, base_request(api, target, stream), st.sampled_from([2, 8]))
        )
    else:
        options.append(
            st.builds(
                messages, base_request(api, target, stream), st.sampled_from([10_000, 100_000])
            )
        )
    return st.one_of(*options)


STRATEGIES: dict[str, Callable[[Api, Target, bool], st.SearchStrategy[FuzzCase]]] = {
    "malformed_json": malformed_json,
    "wrong_type": wrong_type,
    "missing_field": missing_field,
    "out_of_range": out_of_range,
    "empty_prompt": empty_prompt,
    "lone_surrogate": lone_surrogate,
    "invalid_utf8": invalid_utf8,
    "unknown_model": unknown_model,
    "huge_stop": huge_stop,
    "oversize": oversize,
}


def bad_requests(
    api: Api, target: Target, kinds: tuple[str, ...] = KINDS, stream: bool = False
) -> st.SearchStrategy[FuzzCase]:
    """Any of the bad-input classes (each equally likely) for one endpoint."""
    return st.one_of(*(STRATEGIES[k](api, target, stream) for k in kinds))


# -- checking an answer -------------------------------------------------------------------


@dataclass
class Verdict:
    """What one answer was and whether it honours the property."""

    ok: bool
    status: int | None
    outcome: str  # "error", "ok", "5xx", "timeout", "malformed", "accepted"
    problem: str = ""
    error: dict[str, Any] | None = None


def _error_info(err: dict[str, Any]) -> dict[str, Any]:
    """What a verdict records of an error object (the message cut to 500 characters)."""
    info = {k: err.get(k) for k in ("type", "param", "code")}
    info["message"] = str(err.get("message"))[:500]
    return info


def check_error_body(status: int, text: str) -> tuple[str, dict[str, Any] | None]:
    """Problems with a 4xx body (empty string if it is an OpenAI-style error)."""
    try:
        data = json.loads(text)
    except ValueError:
        return f"HTTP {status} body is not JSON: {text[:200]!r}", None
    err = data.get("error") if isinstance(data, dict) else None
    if not isinstance(err, dict):
        return f"HTTP {status} body has no error object: {text[:200]!r}", None
    missing = [k for k in ("message", "type", "param", "code") if k not in err]
    info = _error_info(err)
    if missing:
        return f"HTTP {status} error object lacks {missing}: {text[:200]!r}", info
    if not isinstance(err["message"], str) or not err["message"]:
        return f"HTTP {status} error message is empty or not a string", info
    if not isinstance(err["type"], str):
        return f"HTTP {status} error type is not a string", info
    return "", info


def _check_choice(api: Api, choice: Any) -> str:
    if not isinstance(choice, dict) or not isinstance(choice.get("index"), int):
        return f"choice without index: {str(choice)[:200]}"
    if api == "completions":
        if not isinstance(choice.get("text"), str):
            return f"completion choice without text: {str(choice)[:200]}"
    else:
        msg = choice.get("message")
        if not isinstance(msg, dict) or msg.get("role") != "assistant":
            return f"chat choice without an assistant message: {str(choice)[:200]}"
        if not isinstance(msg.get("content"), (str, type(None))):
            return "chat message content is neither text nor null"
    return ""


def check_ok_body(api: Api, text: str) -> str:
    """Problems with a non-streamed 200 answer (empty string if well-formed)."""
    try:
        data = json.loads(text)
    except ValueError:
        return f"200 body is not JSON: {text[:200]!r}"
    if not isinstance(data, dict):
        return "200 body is not an object"
    if "error" in data:
        return f"200 body carries an error: {text[:300]}"
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        return f"200 body without choices: {text[:300]}"
    for choice in choices:
        if problem := _check_choice(api, choice):
            return problem
        if choice.get("finish_reason") not in ("stop", "length", "abort", None):
            return f"unexpected finish_reason {choice.get('finish_reason')!r}"
    usage = data.get("usage")
    if not isinstance(usage, dict) or not isinstance(usage.get("completion_tokens"), int):
        return "200 body without usage.completion_tokens"
    return ""


def check_stream(text: str) -> str:
    """Problems with a streamed 200 answer: every event JSON, no error chunk, ``[DONE]``."""
    events = sse.payloads(text)
    if not events or events[-1] != sse.DONE:
        return f"stream does not end with {sse.DONE}: {text[-300:]!r}"
    for event in events[:-1]:
        try:
            chunk = json.loads(event)
        except ValueError:
            return f"stream event is not JSON: {event[:200]!r}"
        if sse.is_error(chunk):
            return f"error inside a 200 stream: {event[:300]}"
        if not isinstance(chunk, dict) or not isinstance(chunk.get("choices"), list):
            return f"stream chunk without choices: {event[:200]}"
    return ""


def stream_error(text: str) -> dict[str, Any] | None:
    """The first error event of a stream (``type``, ``param``, ``code``, ``message``)."""
    for payload in sse.payloads(text):
        try:
            chunk = json.loads(payload)
        except ValueError:
            continue
        err = chunk.get("error", chunk) if sse.is_error(chunk) else None
        if isinstance(err, dict):
            return _error_info(err)
    return None


def judge(
    case: FuzzCase, status: int | None, text: str | None, streamed: bool | None = None
) -> Verdict:
    """Apply the property to one answer (``status`` None means the client timed out).

    ``streamed`` says whether the answer was an event stream (from its content type); by
    default, whether the case asked for one.
    """
    if streamed is None:
        streamed = case.stream
    if status is None or text is None:
        return Verdict(False, None, "timeout", "no answer before the client timeout (hang?)")
    if status >= 500:
        problem, info = check_error_body(status, text)
        return Verdict(False, status, "5xx", f"HTTP {status}: {text[:500]}", info)
    if 400 <= status < 500:
        problem, info = check_error_body(status, text)
        return Verdict(not problem, status, "error" if not problem else "malformed", problem, info)
    if status == 200:
        problem = check_stream(text) if streamed else check_ok_body(case.api, text)
        if problem:
            return Verdict(False, status, "malformed", problem, stream_error(text))
        if case.invalid:
            what = ", ".join(
                f"{k}={json.dumps(_jsonable(case.body[k]))}" for k in rejected_fields(case.body)
            )
            return Verdict(False, status, "accepted", f"answered 200 to {what}, which the "
                           "OpenAI API rejects")  # fmt: skip
        return Verdict(True, status, "ok")
    return Verdict(False, status, "malformed", f"unexpected HTTP {status}: {text[:300]}")
