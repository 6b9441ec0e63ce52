"""Gradio chat demo for any OpenAI-compatible endpoint (SGLang with ``--reasoning-parser``, or
``serving.openai_server`` on CPU): streams the reply, shows the model's thinking in a collapsible panel apart from
the answer, math rendered with KaTeX (the bare ``\\boxed{}`` answers too), a system prompt and sampling controls, a
clear message when the endpoint is down, optional login.

    python -m serving.chat_ui --endpoint http://127.0.0.1:8000/v1 [--api-key KEY] [--auth user:password]
"""
from __future__ import annotations

import argparse
import os

import gradio as gr
from openai import APIConnectionError, APIError, APIStatusError, OpenAI

from .reasoning import ReasoningStream

THINKING_TITLE = "Thinking"
# KaTeX in the chat (Gradio bundles it): display $$…$$ and \[…\], inline \(…\) and $…$
LATEX = [{"left": "$$", "right": "$$", "display": True}, {"left": "\\[", "right": "\\]", "display": True},
         {"left": "\\(", "right": "\\)", "display": False}, {"left": "$", "right": "$", "display": False}]
_OPEN = {"$$": "$$", "$": "$", "\\(": "\\)", "\\[": "\\]"}


def math_markup(text: str) -> str:
    """The model writes its final answer as a bare ``\\boxed{…}`` (no $): put each one outside math in $…$ so
    that it renders; text already inside math delimiters is left as it is."""
    out, i, close = [], 0, None
    while i < len(text):
        if close is not None:  # inside math: copy until the delimiter that closes it
            if text.startswith(close, i):
                out.append(close)
                i, close = i + len(close), None
            else:
                out.append(text[i])
                i += 1
            continue
        opener = next((o for o in ("$$", "\\(", "\\[", "$") if text.startswith(o, i) and (i == 0 or text[i - 1] != "\\")),
                      None)
        if opener:
            out.append(opener)
            i, close = i + len(opener), _OPEN[opener]
            continue
        if text.startswith("\\boxed{", i):
            j, depth = i + len("\\boxed{"), 1
            while j < len(text) and depth:
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                j += 1
            if depth == 0:
                out.append("$" + text[i:j] + "$")
                i = j
                continue
        out.append(text[i])
        i += 1
    return "".join(out)


def _text(content) -> str:
    """Gradio 6 history items carry content as a string or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content or "")


def history_to_messages(history: list, system: str, raw_of: dict | None = None) -> list[dict]:
    """Chat history (Gradio messages) → OpenAI messages; the thinking panels are not sent back, and an answer goes
    back as the model wrote it (``raw_of``: displayed text → raw text, kept by ``stream_reply``), not as displayed
    (math markup added, whitespace stripped)."""
    msgs = [{"role": "system", "content": system}] if system.strip() else []
    for h in history:
        role = h.get("role") if isinstance(h, dict) else getattr(h, "role", None)
        meta = (h.get("metadata") if isinstance(h, dict) else getattr(h, "metadata", None)) or {}
        if role not in ("user", "assistant") or meta.get("title"):
            continue
        text = _text(h.get("content") if isinstance(h, dict) else h.content)
        msgs.append({"role": role, "content": (raw_of or {}).get(text, text) if role == "assistant" else text})
    return msgs


def stream_reply(client: OpenAI, model: str, messages: list[dict], temperature: float, top_p: float, max_tokens: int,
                 raw_of: dict | None = None):
    """Yields the assistant turn as Gradio messages: [thinking panel (if any), answer], growing as tokens come.
    Asks for the raw reply (``separate_reasoning: false``, SGLang's and the CPU server's) and splits it here with the
    same rule as SGLang's deepseek-r1 parser; a server that splits anyway is read from ``reasoning_content``."""
    reasoning, answer = "", ""
    parser = ReasoningStream()
    stream = client.chat.completions.create(model=model, messages=messages, temperature=temperature, top_p=top_p,
                                            max_tokens=int(max_tokens), stream=True,
                                            extra_body={"separate_reasoning": False})
    for chunk in stream:
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        r = getattr(d, "reasoning_content", None) or (d.model_extra or {}).get("reasoning_content") or ""
        r2, c = parser.feed(d.content or "")
        reasoning += r + r2
        answer += c
        yield _turn(reasoning, answer, done=False)
    r2, c = parser.close()
    reasoning, answer = reasoning + r2, answer + c
    turn = _turn(reasoning, answer, done=True)
    if raw_of is not None:  # what the next turn sends back for this answer
        raw_of[turn[-1].content] = answer if answer.strip() else reasoning
    yield turn


def _turn(reasoning: str, answer: str, done: bool) -> list:
    if done and reasoning.strip() and not answer.strip():  # no </think> in the whole reply: it is the answer
        reasoning, answer = "", reasoning
    out = []
    if reasoning.strip():
        out.append(gr.ChatMessage(content=math_markup(reasoning.strip()), role="assistant",
                                  metadata={"title": THINKING_TITLE, "status": "done" if done or answer else "pending"}))
    out.append(gr.ChatMessage(content=math_markup(answer.strip()) if answer.strip() else ("" if done else "…"),
                              role="assistant"))
    return out


def build_demo(endpoint: str, api_key: str | None = None, model: str | None = None, title: str = "Ring-lite chat",
               temperature: float = 1.0, top_p: float = 0.95, max_tokens: int = 1024):
    client = OpenAI(base_url=endpoint, api_key=api_key or "none", max_retries=0, timeout=600)
    raw_of: dict[str, str] = {}  # displayed answer -> the model's own text

    def respond(message, history, system, temperature, top_p, max_tokens):
        try:
            name = model or client.models.list().data[0].id
            msgs = history_to_messages(history, system, raw_of) + [{"role": "user", "content": _text(message)}]
            yield from stream_reply(client, name, msgs, temperature, top_p, max_tokens, raw_of)
        except APIConnectionError:
            raise gr.Error(f"The model endpoint {endpoint} is not reachable. Is the server running?")
        except APIStatusError as e:
            raise gr.Error(f"The endpoint refused the request ({e.status_code}): {e.message}")
        except APIError as e:  # an error the server sent inside the stream (SGLang: an abort, a failed step)
            raise gr.Error(f"The endpoint failed during the reply: {e.message}")

    return gr.ChatInterface(
        respond, title=title, description=f"Endpoint: `{endpoint}` — the model's thinking is in the collapsible panel.",
        chatbot=gr.Chatbot(height=520, elem_id="chatbot", label="Chat", latex_delimiters=LATEX),
        textbox=gr.Textbox(placeholder="Ask a question…", elem_id="chat-input", show_label=False),
        additional_inputs=[
            gr.Textbox("", label="System prompt"),
            gr.Slider(0.0, 2.0, value=temperature, step=0.05, label="Temperature"),
            gr.Slider(0.05, 1.0, value=top_p, step=0.05, label="Top-p"),
            gr.Slider(16, 32768, value=max_tokens, step=16, label="Max new tokens"),
        ],
        additional_inputs_accordion=gr.Accordion("Settings", open=False),
        examples=[["What is 15 + 730? Please reason step by step, and put your final answer within \\boxed{}."]],
        run_examples_on_click=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serving.chat_ui", description=__doc__.split("\n\n")[0])
    ap.add_argument("--endpoint", default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"))
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    ap.add_argument("--model", help="model id (default: the endpoint's first model)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--temperature", type=float, default=1.0, help="the sampling controls' starting values")
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--auth", default=os.environ.get("CHAT_UI_AUTH"), help="user:password to require a login")
    a = ap.parse_args(argv)
    auth = tuple(a.auth.split(":", 1)) if a.auth else None
    build_demo(a.endpoint, a.api_key, a.model, temperature=a.temperature, top_p=a.top_p,
               max_tokens=a.max_tokens).queue().launch(server_name=a.host, server_port=a.port, auth=auth,
                                                              show_error=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
