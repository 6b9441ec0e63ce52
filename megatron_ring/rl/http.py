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
            body = r.read()
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        try:
            text = json.loads(text).get("message") or json.loads(text).get("error") or text
        except (ValueError, AttributeError):
            pass
        raise EngineError(f"{url}: HTTP {e.code}: {str(text)[:2000]}") from None
    except OSError as e:
        raise EngineError(f"{url}: {e}") from None
    out = json.loads(body) if body else {}
    if isinstance(out, dict) and out.get("success") is False:
        raise EngineError(f"{url}: {out.get('message')}")
    return out


def post_all(urls: list[str], path: str, body: dict, timeout: float, api_key: str | None) -> list:
    """The same request to every server, concurrently."""
    with ThreadPoolExecutor(max(1, len(urls))) as ex:
        return list(ex.map(lambda u: post(u + path, body, timeout, api_key), urls))


def get(url: str, timeout: float, api_key: str | None) -> dict:
    """GET JSON (SGLang's ``/get_server_info``); errors as ``EngineError``."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except OSError as e:
        raise EngineError(f"{url}: {e}") from None
