"""What a test sends to the gateway as an OpenAI client, and how it reads
the gateway's refusals.

chat(gw, model, ...) posts a chat completion; error_of(r) checks that a
refusal is in the OpenAI error envelope, the one the official SDKs turn
into their exceptions, and returns its "error" object.
"""

import re
import requests

CHAT_PATH = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "Hello there"}]

ENVELOPE = {"message", "type", "param", "code"}
# a client's X-Request-Id as the gateway keeps it, or nginx's $request_id
REQUEST_ID = re.compile(r"[A-Za-z0-9._:+/=@-]{1,128}")


def chat(gw, model="llama-3-8b", *, path=CHAT_PATH, messages=HELLO,
         key=None, token=None, completion=None, headers=None, session=None,
         timeout=30, **fields):
    """POST {"messages": messages, "model": model, **fields} to gw + path.

    model=None leaves "model" out.  key is sent as X-Api-Key, token as a
    Bearer Authorization; completion asks the simulated replica for that
    many completion tokens (x-sim-completion-tokens); headers are added
    as they are.  session: a requests.Session, to keep one connection."""
    body = {"messages": messages}
    if model is not None:
        body["model"] = model
    body.update(fields)
    h = dict(headers or {})
    if key is not None:
        h["x-api-key"] = key
    if token is not None:
        h["Authorization"] = "Bearer " + token
    if completion is not None:
        h["x-sim-completion-tokens"] = str(completion)
    return (session or requests).post(gw.url + path, json=body, headers=h,
                                      timeout=timeout)


def error_of(r):
    """The "error" object of r, after checking the envelope strictly:
    application/json, {"error": {...}} and nothing else, with message,
    type, param and code all present (param null or a string, the others
    non-empty strings)."""
    what = (r.status_code, dict(r.headers), r.text[:300])
    assert r.headers.get("content-type") == "application/json", what
    doc = r.json()
    assert isinstance(doc, dict) and set(doc) == {"error"}, what
    e = doc["error"]
    # the gateway's own errors carry the request's id, a backend's may not
    ours = "x-sim-replica" not in r.headers
    assert isinstance(e, dict) and (set(e) == ENVELOPE | {"request_id"}
                                    or not ours and set(e) == ENVELOPE), what
    for k in ("message", "type", "code"):
        assert isinstance(e[k], str) and e[k], what
    assert e["param"] is None or isinstance(e["param"], str), what
    if ours:
        assert REQUEST_ID.fullmatch(e["request_id"]), what
        assert e["request_id"] == r.headers.get("x-request-id",
                                                e["request_id"]), what
    return e
