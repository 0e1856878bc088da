"""Runtime: carrying out a plan on torch and CUDA.

Owns model sources and checkpoint reading (`sources`, `checkpoint`), building and placing the model
(`loader`, with `Placement` and `placement_of`), the layer ring and its copy streams (`executor`,
`streams`, `layout`), KV caches and the prefix cache (`kv`, `prefix`), CUDA graphs (`graphs`),
managed and unified memory (`managed`, `unified`) and the machine probe (`hardware`).

May import `overspill.errors`, `overspill.planning`, torch and transformers; never `overspill.api`,
`overspill.serving` or the CLI (tests/test_layers.py checks). This file imports nothing eagerly.
"""
