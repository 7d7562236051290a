"""``sparsetorch eval DIR``: perplexity (and a sample) of a saved causal LM."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        model_dir: str = typer.Argument(
            ...,
            help="A Hugging Face causal-LM folder (e.g. from `sparsetorch prune --out`) or 'smollm2'.",
        ),
        text: Path | None = typer.Option(
            None,
            "--text",
            help="Evaluate on this UTF-8 text file instead of the embedded eval text.",
        ),
        windows: int = typer.Option(16, "--windows", help="Number of non-overlapping windows."),
        seq_len: int = typer.Option(512, "--seq-len", help="Tokens per window."),
        batch_size: int = typer.Option(4, help="Evaluation batch size."),
        sample_prompt: str | None = typer.Option(
            None, "--sample-prompt", help="Also print a greedy continuation of this prompt."
        ),
        json_path: Path | None = typer.Option(
            None, "--json", help="Write the result as JSON here."
        ),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --json file."),
    ) -> None:
        """Perplexity of a (pruned) causal LM on fixed token windows, its sparsity, and a sample."""
        import json

        import torch
        from rich.markup import escape

        from ..atomic import atomic_write_text, check_output_file
        from ..cli import console
        from ..data.llm import load_causal_lm, model_max_positions
        from ..data.text import eval_windows, token_windows
        from ..errors import DataError, ModelError
        from ..evaluate import generate_sample, perplexity

        # every argument and the --json path are checked before the model is loaded
        if windows < 1 or seq_len < 2 or batch_size < 1:
            raise DataError("--windows must be >= 1, --seq-len >= 2 and --batch-size >= 1.")
        if text is not None and not text.is_file():
            raise DataError(f"text file {text} does not exist.")
        limit = model_max_positions(model_dir)
        if limit is not None and seq_len > limit:
            raise ModelError(f"--seq-len {seq_len} is longer than {model_dir!r} accepts ({limit} positions, "
                             f"config.max_position_embeddings); pass --seq-len <= {limit}.")
        if json_path is not None:
            check_output_file(json_path, inputs=[model_dir] if Path(model_dir).is_dir() else [], overwrite=overwrite)
        model, tok = load_causal_lm(model_dir, progress=True)
        if text is not None:
            w = token_windows(
                tok, text.read_text(encoding="utf-8"), seq_len=seq_len, max_windows=windows
            )
        else:
            w = eval_windows(tok, windows, seq_len)
        zeros = total = 0
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
                zeros += int((mod.weight == 0).sum())
                total += mod.weight.numel()
        sp = zeros / max(total, 1)
        ppl = perplexity(model, windows=w, batch_size=batch_size)
        console.print(
            f"{escape(model_dir)}: linear-layer sparsity {sp:.4f}; perplexity over {w.shape[0]}x{w.shape[1]} tokens: [bold]{ppl:.3f}[/]"
        )
        result = {
            "model": model_dir,
            "ppl": ppl,
            "windows": int(w.shape[0]),
            "seq_len": int(w.shape[1]),
            "sparsity_linear": sp,
        }
        if sample_prompt:
            out = generate_sample(model, tok, sample_prompt)
            console.print(f"[bold]prompt[/]: {escape(sample_prompt)}\n[bold]sample[/]: {escape(out)}")
            result["sample"] = out
        if json_path is not None:
            atomic_write_text(json_path, json.dumps(result, indent=2) + "\n", overwrite=overwrite)
