"""Draft trees and their verification in one pass of the target.

A chain bets a whole pass on the draft's first choice at every step; a tree spends the same pass on
alternatives where the draft is unsure (`planning/trees.py` counts what that buys). A `DraftTree`
is a token per node and the index of its parent (-1: the root, the last emitted token, whose KV is
written by the same pass). The pass carries [root, nodes...]; each node sits at position
`past + depth` and must see only the cache and its own ancestors:

- batched (`serial=False`): one forward with a tree attention mask, per layer kind (a
  sliding-window layer also masks what fell out of its window);
- serial (`serial=True`, where `token_serial` applies): each layer runs the nodes one at a time in
  depth-first order, its KV cropped back to the node's ancestors first, so every node is computed
  exactly as a plain decode step would compute it: greedy stays plain greedy bit for bit in bf16.

Either way each node's keys and values are captured as the layers write them, and `keep_path`
leaves the cache holding exactly prefix + root + the accepted path: it crops where the accepted path
is already what the cache holds (serial visits the draft's favourite branch last, so that is the
common case) and otherwise crops back to the root and writes the accepted nodes' captured KV.
That works on any layer the cache holds — transformers' own, `PresizedLayer`, `HostKVLayer` —
through their public `crop`/`update`, with no knowledge of where their bytes live.

`walk_tree` is the walk down a verified tree that `runtime.speculative` and the serving engine share:
the target's token at each node (as a plain step picks it), then the drafted child holding it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from ..errors import OverspillError
from ..planning.trees import Choice
from ..planning.trees import depths as tree_depths
from .token_serial import serial_tokens


@dataclass
class DraftTree:
    """Drafted tokens as a tree: node i is `tokens[i]`, following `parents[i]` (-1: the root).
    Parents come before children; siblings are listed in the draft's order of preference."""

    tokens: torch.Tensor  # [n] token ids
    parents: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.parents) != int(self.tokens.shape[0]):
            raise ValueError(f"{self.tokens.shape[0]} tokens but {len(self.parents)} parents")

    @classmethod
    def chain(cls, tokens: torch.Tensor) -> "DraftTree":
        """A chain as a tree: each token follows the one before."""
        return cls(tokens, list(range(-1, int(tokens.shape[0]) - 1)))

    def __len__(self) -> int:
        return len(self.parents)

    def depths(self) -> list[int]:
        return tree_depths(self.parents)

    def children(self) -> dict[int, list[int]]:
        """Children of each node (-1: the root), in the draft's order."""
        out: dict[int, list[int]] = {-1: []}
        for i, parent in enumerate(self.parents):
            out.setdefault(parent, []).append(i)
            out.setdefault(i, [])
        return out

    def path(self, node: int) -> list[int]:
        """The nodes from the root's child down to `node`."""
        out = []
        while node >= 0:
            out.append(node)
            node = self.parents[node]
        return out[::-1]

    def select(self, nodes: list[int]) -> "DraftTree":
        """The subtree of `nodes` (each one's parent among them, or the root), in the given order."""
        where = {node: i for i, node in enumerate(nodes)}
        parents = [-1 if self.parents[n] < 0 else where[self.parents[n]] for n in nodes]
        return DraftTree(self.tokens[torch.tensor(nodes, dtype=torch.long, device=self.tokens.device)]
                         if nodes else self.tokens[:0], parents)

    def prune(self, max_nodes: int, max_depth: int) -> "DraftTree":
        """The first `max_nodes` nodes no deeper than `max_depth` (ancestors are always kept)."""
        keep = [i for i, d in enumerate(self.depths()) if d <= max_depth][: max(max_nodes, 0)]
        return self.select(keep)

    def ranks(self) -> list[int]:
        """Each node's place among its siblings (0: the draft's first choice)."""
        seen: dict[int, int] = {}
        out = []
        for parent in self.parents:
            out.append(seen.get(parent, 0))
            seen[parent] = out[-1] + 1
        return out

    def preorder(self) -> tuple["DraftTree", list[int]]:
        """Depth-first order, the draft's favourite child visited last (serial verification then
        ends with the most likely branch in the cache, usually the one accepted); with the original
        index of each node."""
        kids = self.children()
        order: list[int] = []
        stack = list(kids[-1])
        while stack:
            node = stack.pop()
            order.append(node)
            stack.extend(kids[node])
        return self.select(order), order


def fit_pass(drafted: DraftTree, budget: int, room: int, serial: bool) -> DraftTree:
    """`drafted` cut to what one verify pass may hold with `room` tokens of planned KV left: at most
    `budget` nodes, none deeper than `room`; a batched pass writes every node's KV, so also at most
    `room` nodes (a serial one holds one branch at a time)."""
    room = max(room, 0)
    return drafted.prune(budget if serial else min(budget, room), room)


Captured = list[list[torch.Tensor]]
"""Per cache layer, the key (or value) chunks written during a pass, in order ([b, h, t, d] each)."""


@dataclass
class TreePass:
    """What one verify pass over [root, nodes] left: logits per position and each layer's captured KV."""

    tree: DraftTree
    logits: torch.Tensor  # [n + 1, vocab] float: row 0 after the root, row i + 1 after node i
    past: int  # tokens the cache held before the pass
    keys: Captured
    values: Captured
    resident: list[int]  # nodes (after the root) the cache holds after the pass, in order


def tree_mask(tree: DraftTree, prefix: int, dtype: torch.dtype, device: torch.device,
              window: int | None = None, visible: int | None = None, columns: list[int] | None = None,
              queries: list[int] | None = None, chunk: int | None = None) -> torch.Tensor:
    """Additive attention mask [1, 1, queries, kv] for tree tokens after a cache of `prefix` tokens.

    Without `columns`, the pass is a target's verify pass: the queries, and the KV after the prefix,
    are [root, every node]. With `columns` (node indices in the order their KV follows the prefix,
    ending with `queries`), the prefix already ends with the root: a drafter growing a tree round by
    round. A query sees the prefix, its ancestors and itself; with a sliding `window` only what lies
    within it, of which the layer keeps the last `visible` prefix tokens; with a `chunk` (Llama 4's chunked
    attention, whose layers transformers caches as sliding windows of that size) only what lies in its own
    chunk of positions.
    """
    if columns is None:
        parents = [-1] + [p + 1 for p in tree.parents]  # node 0 is the root
        pos = [0] + tree.depths()
        base = prefix
        columns = queries = list(range(len(parents)))
    else:
        parents, pos, base = tree.parents, tree.depths(), prefix - 1
        queries = list(queries or [])
    seen = torch.zeros((len(queries), len(parents)), dtype=torch.bool)
    for row, node in enumerate(queries):
        while node >= 0:
            seen[row, node] = True
            node = parents[node]
    q_pos = torch.tensor([base + pos[i] for i in queries])
    shown = prefix if (window is None and chunk is None) or visible is None else min(prefix, visible)
    see_prefix = torch.ones((len(queries), shown), dtype=torch.bool)
    if window is not None:
        see_prefix = (q_pos[:, None] - torch.arange(prefix - shown, prefix)[None, :]) < window
        seen &= (q_pos[:, None] - torch.tensor([base + p for p in pos])[None, :]) < window
    if chunk is not None:
        see_prefix &= (q_pos[:, None] // chunk) == (torch.arange(prefix - shown, prefix)[None, :] // chunk)
        seen &= (q_pos[:, None] // chunk) == (torch.tensor([base + p for p in pos])[None, :] // chunk)
    cols = torch.cat([see_prefix, seen[:, columns]], dim=1)
    mask = torch.zeros(cols.shape, dtype=dtype)
    mask.masked_fill_(~cols, torch.finfo(dtype).min)
    return mask[None, None].to(device)


def _layer_window(layer: Any) -> int | None:
    return getattr(layer, "sliding_window", None) if getattr(layer, "is_sliding", False) else None


def _kept(layer: Any) -> int:
    """Tokens a layer will show attention besides the new ones: a sliding layer at most window - 1."""
    window = _layer_window(layer)
    if window is None:
        return layer.get_seq_length()
    keys = getattr(layer, "keys", None)
    return min(int(keys.shape[-2]) if keys is not None and keys.numel() else 0, window - 1)


def model_masks(cache, tree: DraftTree, prefix: int, dtype: torch.dtype, device: torch.device,
                columns: list[int] | None = None, queries: list[int] | None = None,
                layer_types: list[str] | None = None):
    """The `attention_mask` argument for a tree pass: one 4D mask, or one per layer kind where
    full-attention and sliding-window layers mix (models then read a dict keyed by layer type).
    `layer_types` (the config's, one per cache layer) tells Llama 4's chunked-attention layers, which the
    cache holds as sliding windows of the chunk's size, from sliding ones."""
    layers = list(getattr(cache, "layers", []))
    full = tree_mask(tree, prefix, dtype, device, columns=columns, queries=queries)
    types = list(layer_types or [])
    chunked = [layer for layer, kind in zip(layers, types) if kind == "chunked_attention"]
    if chunked:
        windows = {_layer_window(layer) for layer in chunked}
        if len(windows) != 1 or None in windows or len(types) != len(layers):
            raise OverspillError("draft trees over these chunked-attention layers are not supported: "
                                 "leave speculate_tree unset (chains)")
        if any(kind not in ("chunked_attention", "full_attention") for kind in types):
            raise OverspillError("draft trees over chunked and sliding-window layers together are not supported: "
                                 "leave speculate_tree unset (chains)")
        chunk = windows.pop()
        masks = {"full_attention": full,
                 "chunked_attention": tree_mask(tree, prefix, dtype, device, visible=_kept(chunked[0]),
                                                columns=columns, queries=queries, chunk=chunk)}
        return {kind: masks[kind] for kind in set(types)}
    sliding = [layer for layer in layers if _layer_window(layer) is not None]
    if not sliding:
        return full
    windows = {_layer_window(layer) for layer in sliding}
    if len(windows) > 1:
        raise OverspillError("draft trees over sliding-window layers of different sizes are not supported")
    slide = tree_mask(tree, prefix, dtype, device, window=windows.pop(), visible=_kept(sliding[0]),
                      columns=columns, queries=queries)
    if len(sliding) == len(layers):
        return slide
    return {"full_attention": full, "sliding_attention": slide}


@contextlib.contextmanager
def capture_kv(cache, expect: list[int] | None = None) -> Iterator[tuple[Captured, Captured]]:
    """Record the keys and values each cache layer is given while the block runs. `expect[i]`: the
    KV length layer i must hand attention (checked, so a cache that shows a different span than the
    mask assumes fails loudly instead of attending to the wrong tokens)."""
    layers = cache.layers
    keys: Captured = [[] for _ in layers]
    values: Captured = [[] for _ in layers]
    patched = []

    def wrap(i: int, layer: Any):
        update = layer.update

        def recorded(key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            keys[i].append(key_states)
            values[i].append(value_states)
            out = update(key_states, value_states, *args, **kwargs)
            if expect is not None and out[0].shape[-2] != expect[i]:
                raise OverspillError(f"cache layer {i} ({type(layer).__name__}) showed {out[0].shape[-2]} tokens to "
                                     f"attention where the tree mask covers {expect[i]}")
            return out

        return recorded

    try:
        for i, layer in enumerate(layers):
            patched.append((layer, layer.__dict__.get("update")))
            layer.update = wrap(i, layer)
        yield keys, values
    finally:
        for layer, before in patched:
            if before is None:
                del layer.update
            else:
                layer.update = before


def _crop_to(layer: Any, length: int) -> None:
    extra = layer.get_seq_length() - length
    if extra > 0:
        layer.crop(-extra)


@torch.no_grad()
def verify_tree(model, cache, kwarg: str, root: torch.Tensor, tree: DraftTree, serial: bool) -> TreePass:
    """One target pass over `root` ([1] token, not yet in the cache) and `tree` (in `preorder`).

    Returns the logits after every position and each layer's captured KV; the cache then holds the
    prefix, the root and `TreePass.resident` (pass it to `keep_path`).
    """
    past = cache.get_seq_length()
    n = len(tree)
    ids = torch.cat([root.view(1), tree.tokens.to(root.device)]).view(1, n + 1)
    depth = [0] + tree.depths()
    positions = torch.tensor([[past + d for d in depth]], device=root.device)
    dtype = next(model.parameters()).dtype
    mask = model_masks(cache, tree, past, dtype, root.device,
                       layer_types=getattr(model.config.get_text_config(), "layer_types", None))
    before = None
    if serial:
        def before(layer_index: int, j: int) -> None:  # only the token's ancestors in this layer's KV
            _crop_to(cache.layers[layer_index], past + depth[j])

        expect = None
        resident = tree.path(n - 1) if n else []
    else:
        expect = [_kept(layer) + n + 1 for layer in cache.layers]
        resident = list(range(n))
    with capture_kv(cache, expect) as (keys, values), \
            serial_tokens(model, before) if serial and n else contextlib.nullcontext():
        out = model(input_ids=ids, position_ids=positions, attention_mask=mask, **{kwarg: cache}, use_cache=True,
                    logits_to_keep=n + 1)
    return TreePass(tree, out.logits[0, -(n + 1):].float(), past, keys, values, resident)


def keep_path(cache, tree_pass: TreePass, path: list[int]) -> None:
    """Leave the cache holding the prefix, the root and the nodes of `path` (root's child first)."""
    past, m = tree_pass.past, len(path)
    resident = tree_pass.resident
    if path == resident[:m]:
        for layer in cache.layers:
            _crop_to(layer, past + 1 + m)
        return
    index = torch.tensor([node + 1 for node in path])
    for i, layer in enumerate(cache.layers):
        k = torch.cat(tree_pass.keys[i], dim=-2)  # [b, h, n + 1, d]: root, then the nodes in pass order
        v = torch.cat(tree_pass.values[i], dim=-2)
        _crop_to(layer, past + 1)
        if m:
            layer.update(k[:, :, index.to(k.device)], v[:, :, index.to(v.device)])


@dataclass
class Walk:
    """Where the target's tokens led through a verified tree."""

    path: list[int] = field(default_factory=list)  # accepted nodes of `TreePass.tree`, the root's child first
    rows: list[int] = field(default_factory=list)  # the logits row each token came from (0: after the root)
    tokens: list[int] = field(default_factory=list)  # the path's tokens, then the target's own (unless stopped)
    choices: list[Choice] = field(default_factory=list)  # at each node with drafted children (`RankAcceptance`)
    stopped: bool = False  # `stop` ended the walk on an accepted token: no token of the target's own follows


def walk_tree(tree_pass: TreePass, ranks: list[int], order: list[int], pick: Callable[[int], int],
              stop: Callable[[int], bool] | None = None) -> Walk:
    """Walk a verified tree as plain decoding would go: from the root, the target's token for the node's
    row, then the drafted child holding it, until no child does (that token is the target's own).

    Args:
        tree_pass: the verify pass over `DraftTree.preorder`'s tree.
        ranks: `DraftTree.ranks` of the tree as drafted (0: the draft's first choice among siblings).
        order: `preorder`'s original index of each node of `tree_pass.tree`.
        pick: the target's token for a logits row, as a plain step picks it (the argmax, or one draw);
            called once per node visited, root first.
        stop: called with each accepted token; True ends the walk there (a stopping criterion fired).
    """
    tree = tree_pass.tree
    kids, drafted = tree.children(), tree.tokens.tolist()  # one device read, not one per comparison
    walk, node = Walk(), -1
    while True:
        walk.rows.append(node + 1)
        token = pick(node + 1)
        walk.tokens.append(token)
        child = next((c for c in kids[node] if drafted[c] == token), None)
        if kids[node]:
            walk.choices.append(Choice(len(kids[node]), None if child is None else ranks[order[child]]))
        if child is None:
            return walk
        walk.path.append(child)
        node = child
        if stop is not None and stop(token):
            walk.stopped = True
            return walk
