"""What a pipeline rank runs in the tests (`overspill.runtime.launch.spawn` imports it in each process)."""

from __future__ import annotations


def generate_rank(load_kwargs: dict, input_ids: list[list[int]], generate_kwargs: dict, seed: int = 0,
                  attention_mask: list[list[int]] | None = None) -> dict:
    """One rank of a pipeline: `overspill.load(pipeline=True, **load_kwargs)`, then `generate` on `input_ids`
    (every rank alike; `attention_mask` for left-padded rows). Returns this rank's tokens, span, plan facts
    and hidden-state bytes sent."""
    import torch

    from overspill.api import load
    from overspill.runtime.launch import model_stage
    from overspill.runtime.loader import placement_of
    from overspill.runtime.pipeline import rank_summary

    torch.manual_seed(seed)  # sampling draws alike on every rank
    model, _ = load(pipeline=True, progress=False, **load_kwargs)
    placement = placement_of(model)
    ids = torch.tensor(input_ids, dtype=torch.long, device=placement.device)
    with torch.inference_mode():
        mask = torch.ones_like(ids) if attention_mask is None else torch.tensor(attention_mask, device=ids.device)
        out = model.generate(ids, attention_mask=mask, **generate_kwargs)
    import torch.distributed as dist

    stage = model_stage(model)
    span = stage.span
    return {"rank": dist.get_rank(), "tokens": out.tolist(), "start": span.start, "stop": span.stop,
            "streamed_layers": list(placement.plan.streamed_layers), "resident_layers": span.resident_layers,
            "sent_bytes": stage.links.sent, "messages": stage.links.messages, "summary": rank_summary(stage, placement),
            "split": stage.split.summary()}
