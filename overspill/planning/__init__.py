"""Planning: what fits where, decided from a model's config and a machine profile alone.

Owns the byte-level model shape (`spec`), the placement decisions as data (`plan`), the rules that
make them (`placement`), the cost model and machine profiles (`costmodel`, `profile`), the KV block
bookkeeping (`kvblocks`), the `overspill plan` rendering (`planview`), size parsing (`units`) and the
shipped config.json files (`configs`).

Pure Python: may import only the standard library, `overspill.errors` and other planning modules;
never torch, transformers or numpy, not even indirectly, and never `overspill.runtime` or
`overspill.serving` (tests/test_layers.py checks both). This file imports nothing, so importing one
planning module loads only what that module needs.
"""
