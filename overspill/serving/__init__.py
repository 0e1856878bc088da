"""Serving: many requests over one placed model.

Owns the engine thread and its continuous batching (`engine`, `batching`, `graph_batch`), requests,
sampling and detokenization (`requests`, `sampling`, `detok`, `prompt_bound`), the OpenAI-compatible
HTTP server and its schemas (`server`, `schemas`, `openai_protocol`, `metrics`) and the `overspill
batch` runner (`batch`).

May import `overspill.errors`, `overspill.planning`, `overspill.runtime` and `overspill.api`
(to load a model); nothing below it imports serving. This file imports nothing eagerly, so the
server extras (fastapi, pydantic, prometheus-client) load only with the modules that need them.
"""
