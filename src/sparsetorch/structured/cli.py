"""``sparsetorch prune-structured``: a smaller model (fewer heads, channels, blocks) that plain
``transformers`` loads, with the pruning plan as JSON."""

from __future__ import annotations

from pathlib import Path

import typer

PLAN_FILE = "structured_plan.json"


def register(app: typer.Typer) -> None:
    @app.command("prune-structured")
    def prune_structured_cmd(
        model: str = typer.Option("smollm2", "--model", "-m", help="'smollm2' or a local Hugging Face causal-LM folder."),
        remove: float = typer.Option(..., "--remove", help="Fraction of the decoder blocks' parameters to remove, in "
                                     "(0, 1) (the embedding / LM head is not counted)."),
        score: str = typer.Option("flap", "--score", help="flap, wanda, taylor or magnitude."),
        what: str = typer.Option("channels", "--what", help="Comma-separated: heads, channels, blocks (default "
                                 "channels: on SmolLM2 heads and blocks cost far more perplexity per parameter)."),
        allocation: str = typer.Option("global", "--allocation",
                                       help="global (FLAP: ranked scores split the budget) or uniform (same fraction "
                                            "of attention and MLP)."),
        compensate: bool | None = typer.Option(None, "--compensate/--no-compensate",
                                               help="Fold the removed features' mean into the output bias (default: "
                                                    "with flap)."),
        block_share: float = typer.Option(0.5, "--block-share", help="Share of the budget taken by whole blocks "
                                          "when blocks are combined with heads/channels."),
        calib_samples: int = typer.Option(32, "--calib-samples", help="Calibration windows."),
        seq_len: int = typer.Option(512, "--seq-len", help="Tokens per calibration and evaluation window."),
        eval_windows: int = typer.Option(16, "--eval-windows", help="Evaluation windows for perplexity (0 skips it)."),
        out: Path | None = typer.Option(None, "--out", "-o", help="Write the smaller HF model folder here."),
        json_path: Path | None = typer.Option(None, "--json", help="Write a JSON summary here."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder / --json file."),
    ) -> None:
        """Remove heads (GQA-aware), MLP channels and/or blocks; print and save the smaller model."""
        import json

        from ..cli import _peak_rss_mb, _say, check_outputs, write_json_summary
        from ..errors import DataError
        from .prune import check_arguments, check_model_compensation, prune_structured

        if seq_len < 2 or eval_windows < 0 or calib_samples < 1:
            raise DataError("--seq-len must be >= 2, --eval-windows >= 0, --calib-samples >= 1.")
        key, kinds = check_arguments(remove, score, what, allocation, block_share, 8)
        from ..data.llm import model_max_positions

        limit = model_max_positions(model)
        if limit is not None and seq_len > limit:
            from ..errors import ModelError

            raise ModelError(f"--seq-len {seq_len} is longer than {model!r} accepts ({limit} positions); "
                             f"pass --seq-len <= {limit}.")
        inputs = check_outputs(model, out, json_path, overwrite)

        from ..data.llm import load_causal_lm, save_hf_model
        from ..data.text import calibration_windows
        from ..data.text import eval_windows as make_eval_windows
        from ..evaluate import perplexity

        lm, tokenizer = load_causal_lm(model, progress=True)
        from .arch import decoder_of

        check_model_compensation(decoder_of(lm), key, kinds, compensate)  # before the dense evaluation
        ew = make_eval_windows(tokenizer, eval_windows, seq_len) if eval_windows else None
        ppl_dense = perplexity(lm, windows=ew) if ew is not None else None
        if ppl_dense is not None:
            _say(f"dense perplexity: [bold]{ppl_dense:.3f}[/]")
        calib = calibration_windows(tokenizer, calib_samples, seq_len)
        res = prune_structured(lm, remove, score=score, what=what, allocation=allocation, calibration=calib,
                               seq_len=seq_len, compensate=compensate, block_share=block_share)
        _say(f"removed {res.removed_fraction:.1%} of the decoder's parameters ({res.params_before:,} -> "
             f"{res.params_after:,}) in {res.seconds:.1f} s; config now {res.config}")
        ppl = perplexity(lm, windows=ew) if ew is not None else None
        if ppl is not None:
            _say(f"pruned perplexity: [bold]{ppl:.3f}[/]")
        summary = {"model": model, "score": res.score, "what": res.what, "allocation": res.allocation,
                   "remove": remove, "removed_fraction": res.removed_fraction,
                   "params_before": res.params_before, "params_after": res.params_after,
                   "total_params_before": res.total_params_before, "total_params_after": res.total_params_after,
                   "ppl_dense": ppl_dense, "ppl_pruned": ppl, "config": res.config,
                   "removed": {"blocks": [b["index"] for b in res.blocks_removed],
                               "heads_per_layer": _count(res.layers, "heads_removed"),
                               "kv_heads_per_layer": _count(res.layers, "kv_heads_removed"),
                               "channels_per_layer": _count(res.layers, "channels_removed")},
                   "compensated": res.compensated, "seconds_prune": res.seconds, "calib_samples": calib_samples,
                   "seq_len": seq_len, "eval_windows": 0 if ew is None else int(ew.shape[0]),
                   "peak_rss_mb": _peak_rss_mb()}
        if out is not None:
            from ..analysis.report import MASKS_FILE

            def extra(tmp: Path) -> None:
                (tmp / PLAN_FILE).write_text(json.dumps({**summary, "plan": res.to_dict()}, indent=2), encoding="utf-8")
                dense_masks(lm).save(tmp / MASKS_FILE)

            saved = save_hf_model(lm, tokenizer, out, extra=extra, overwrite=overwrite, inputs=inputs)
            _say(f"saved the smaller model, {PLAN_FILE} and all-True {MASKS_FILE} (for `sparsetorch finetune`) "
                 f"to {saved}")
        write_json_summary(json_path, summary, overwrite)


def dense_masks(model):  # noqa: ANN001, ANN201
    """All-True masks over every 2-D weight but the embedding: nothing is sparse, and `sparsetorch
    finetune` (which trains the masked layers and keeps their masks) can recover the model."""
    import torch

    from ..masks import MaskSet

    return MaskSet({n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()
                    if p.dim() == 2 and "embed" not in n})


def _count(layers: list[dict], key: str) -> int:
    """How many structures of ``key`` each layer lost (the same in every layer)."""
    return len(layers[0].get(key, [])) if layers else 0
