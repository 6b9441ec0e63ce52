"""HTTP to the rollout servers (SGLang's native API, or the CPU server speaking it): JSON in and out, and a server's
refusal as an ``EngineError`` carrying the server's own message."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor


class EngineError(RuntimeError):
    """A rollout server refused or failed a request (its own message attached)."""


def post(url: str, payload: dict | None = None, timeout: float = 600.0, api_key: str | None = None) -> dict:
    """POST JSON; an HTTP error carries the server's message (SGLang answers 400 with {"message": ...})."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=json.dumps(payload or {}).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body, kind = r.read(), r.headers.get_content_type()
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        try:
            text = json.loads(text).get("message") or json.loads(text).get("error") or text
        except (ValueError, AttributeError):
            pass
        raise EngineError(f"{url}: HTTP {e.code}: {str(text)[:2000]}") from None
    except OSError as e:
        raise EngineError(f"{url}: {e}") from None
    if kind != "application/json":  # SGLang's /flush_cache answers plain text ("Cache flushed. ...")
        return {"text": body.decode(errors="replace")}
    out = json.loads(body) if body else {}
    if isinstance(out, dict) and out.get("success") is False:
        raise EngineError(f"{url}: {out.get('message')}")
    return out


def post_all(urls: list[str], path: str, body: dict, timeout: float, api_key: str | None) -> list:
    """The same request to every server, concurrently."""
    with ThreadPoolExecutor(max(1, len(urls))) as ex:
        return list(ex.map(lambda u: post(u + path, body, timeout, api_key), urls))


def flush_all(urls: list[str], wait_s: float, timeout: float, api_key: str | None) -> None:
    """SGLang's ``/flush_cache`` on every server, each waiting up to ``wait_s`` for its running requests to end
    (SGLang flushes only when idle; without the wait a router health check in flight makes it a 400)."""
    post_all(urls, f"/flush_cache?timeout={wait_s:g}", {}, timeout, api_key)


def get(url: str, timeout: float, api_key: str | None) -> dict:
    """GET JSON (SGLang's ``/get_server_info``); errors as ``EngineError``."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except OSError as e:
        raise EngineError(f"{url}: {e}") from None


FLUSH_WAIT_S = 60.0  # how long a server may take to finish the requests still running before it flushes


def open_sessions(urls: list[str], timeout: float, api_key: str | None) -> None:
    """SGLang 0.5.23 loads weights from a broadcast or from tensors only inside a weight-update session: open one
    on every server (before the first bucket of a sync). A session left open by a trainer that died during a sync
    (servers attached by URL outlive it) is closed and opened again: this sync sends every weight anyway."""
    def begin(u: str) -> None:
        try:
            post(u + "/begin_weight_update", {}, timeout, api_key)
        except EngineError as e:
            if "already open" not in str(e):
                raise
            post(u + "/end_weight_update", {}, timeout, api_key)
            post(u + "/begin_weight_update", {}, timeout, api_key)

    with ThreadPoolExecutor(max(1, len(urls))) as ex:
        list(ex.map(begin, urls))


def close_sessions(urls: list[str], timeout: float, api_key: str | None) -> None:
    """Close the sessions (SGLang runs its weight post-processing here), then flush the servers' caches."""
    post_all(urls, "/end_weight_update", {}, timeout, api_key)
    flush_all(urls, FLUSH_WAIT_S, timeout, api_key)


def abandon_sessions(urls: list[str], timeout: float, api_key: str | None) -> None:
    """After a failed sync: close what is open, so the next sync can open its sessions (errors ignored: a server
    that never opened one refuses, a dead one does not answer)."""
    for u in urls:
        try:
            post(u + "/end_weight_update", {}, timeout, api_key)
        except EngineError:
            pass
