"""Serving: HF export, SGLang launch, the CPU OpenAI-compatible server and the Gradio chat demo."""
