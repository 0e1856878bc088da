"""Serving: many requests over one placed model.

The engine is three parts joined by a short step loop (cf. nano-vllm): `scheduler` decides, without
torch, which requests wait, prefill, decode or end and the KV blocks each holds (one
`planning.kvblocks.KVBlockManager` counts the running requests', the prefix pool's and the host-tier
KV layers' blocks); `runner` owns everything that touches torch and the device (caches, prefill
passes, the decode batch of `batching` or `graph_batch`, sampling, prefix-pool copies); `engine` runs
the loop on the one thread that owns the model, and `speculate` drafts and verifies chains for a
request that runs alone. Around it: requests, events and sampling (`requests`, `sampling`, `detok`,
`prompt_bound`), the OpenAI-compatible HTTP server and its schemas (`server`, `schemas`,
`openai_protocol`, `metrics`), the `overspill batch` runner (`batch`) and the commands' defaults
(`defaults`).

May import `overspill.errors`, `overspill.planning`, `overspill.runtime` and `overspill.api`
(to load a model); nothing below it imports serving. This file imports nothing eagerly, so the
server extras (fastapi, pydantic, prometheus-client) load only with the modules that need them.
"""
