"""``sparsetorch finetune DIR``: recover a pruned causal LM by mask-preserving fine-tuning."""

from __future__ import annotations

from pathlib import Path

import typer

LOSS_HELP = "ce, kd, squarehead, kd+squarehead, or a weighted sum such as 0.5*ce+kd."


def check_data(data: str) -> Path | None:
    """Validate ``--data`` before any model is loaded: ``embedded``, ``docs`` (the python3.11-doc
    sections must be installed) or a non-empty UTF-8 text FILE (returned as a Path)."""
    from ..errors import DataError

    if data == "embedded":
        return None
    if data == "docs":
        from .lm import docs_files

        docs_files()
        return None
    path = Path(data).expanduser()
    if not path.is_file():
        raise DataError(f"--data {data!r} is neither 'embedded', 'docs' nor an existing text file.")
    try:
        empty = not path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as exc:
        raise DataError(f"--data file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
    if empty:
        raise DataError(f"--data file {path} is empty; pass a text file with training text.")
    return path


def load_text_windows(tokenizer, data: str, seq_len: int):  # noqa: ANN001, ANN201
    """Training windows for ``--data``: ``embedded`` (the calibration half of the embedded corpus),
    ``docs`` (Debian python3.11-doc sections, see DOCS_SECTIONS) or a UTF-8 text FILE."""
    from ..data.text import token_windows
    from .lm import embedded_windows, python_docs_text

    path = check_data(data)
    if data == "embedded":
        return embedded_windows(tokenizer, seq_len)
    text = python_docs_text() if path is None else path.read_text(encoding="utf-8")
    return token_windows(tokenizer, text, seq_len=seq_len)


def register(app: typer.Typer) -> None:
    @app.command("finetune")
    def finetune_cmd(
        model_dir: str = typer.Argument(..., help="A pruned Hugging Face folder (from `sparsetorch prune --out`)."),
        out: Path = typer.Option(..., "--out", "-o", help="Write the fine-tuned HF folder (+ masks) here."),
        teacher: str | None = typer.Option(
            None, "--teacher", help="The dense model: 'smollm2' or an HF folder (needed by kd and squarehead)."),
        loss: str = typer.Option("kd", "--loss", help=LOSS_HELP),
        steps: int = typer.Option(100, "--steps", help="Optimizer steps."),
        lr: float | None = typer.Option(None, "--lr", help="Peak learning rate (AdamW, warm-up then cosine); "
                                        "default 1e-4, or 1e-3 with --lora."),
        batch: int = typer.Option(4, "--batch", help="Windows per micro-batch."),
        grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step."),
        seq_len: int = typer.Option(512, "--seq-len", help="Tokens per training and evaluation window."),
        data: str = typer.Option("embedded", "--data",
                                 help="'embedded' (calibration half), 'docs' (python3.11-doc sections) or a text FILE."),
        temperature: float = typer.Option(1.0, "--temperature", help="KD temperature."),
        weight_decay: float = typer.Option(0.0, "--weight-decay"),
        max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", help="Clip the masked gradients' norm (0: off)."),
        eval_windows: int = typer.Option(16, "--eval-windows", help="Evaluation windows (0 skips evaluation)."),
        eval_every: int | None = typer.Option(None, "--eval-every", help="Evaluate every N steps too."),
        checkpoint_dir: Path | None = typer.Option(None, "--checkpoint-dir", help="Write resumable checkpoints here."),
        checkpoint_every: int | None = typer.Option(None, "--checkpoint-every", help="Checkpoint every N steps."),
        resume: Path | None = typer.Option(None, "--resume", help="Continue from this checkpoint folder."),
        bf16: str = typer.Option("auto", "--bf16", help="bf16 autocast: auto (where the hardware has bf16), on, off."),
        gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing"),
        seed: int = typer.Option(0, "--seed"),
        lora: int = typer.Option(0, "--lora", help="Train sparse LoRA adapters of rank R (masked delta, SQFT) and "
                                 "write the merged model; 0 = full fine-tuning (the default --lr becomes 1e-3)."),
        lora_alpha: float | None = typer.Option(None, "--lora-alpha", help="LoRA alpha (scaling alpha/R); default 2R."),
        lora_dropout: float = typer.Option(0.0, "--lora-dropout", help="Dropout on the adapter path."),
        lora_targets: str | None = typer.Option(
            None, "--lora-targets", help="Comma-separated module names or suffixes to adapt (e.g. q_proj,v_proj); "
            "default: every pruned linear layer."),
        update: str | None = typer.Option(
            None, "--update", help="Sparse backpropagation: train only what SPEC names, e.g. last:4, bias,norm, "
            "q_proj,v_proj or channels:0.125@mlp.up_proj (terms joined by ',' or '+'; see docs/sparse_backprop.md)."),
        json_path: Path | None = typer.Option(None, "--json", help="Also write the run summary as JSON here."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder / --json file."),
    ) -> None:
        """Fine-tune a pruned causal LM without changing its masks; report perplexity before/after.

        With --lora R only sparse LoRA adapters train; they are merged with the mask at the end,
        so the written model is a plain HF folder with exactly the parent's masks. With --update SPEC only
        that part trains (the rest is frozen and costs no backward pass)."""
        import json
        import time

        from rich.markup import escape

        from ..analysis.report import MASKS_FILE
        from ..cli import _peak_rss_mb, _say, check_outputs, write_json_summary
        from ..data.llm import load_causal_lm, model_max_positions, save_hf_model
        from ..data.text import eval_windows as make_eval_windows
        from ..errors import DataError, ModelError
        from ..masks import MaskSet
        from .lm import check_options, finetune
        from .loop import FinetuneError
        from .lora import LoraError, LoraSettings
        from .losses import parse_loss

        # every argument and output is checked before a model is loaded
        spec = parse_loss(loss)
        if lora < 0:
            raise LoraError(f"--lora must be a rank >= 1 (or 0 for full fine-tuning), got {lora}")
        targets = None
        if lora_targets is not None:
            targets = tuple(t.strip() for t in lora_targets.split(",") if t.strip())
            if not targets:
                raise LoraError(f"--lora-targets {lora_targets!r} names no module; pass e.g. q_proj,v_proj")
        if lora == 0 and (lora_alpha is not None or lora_dropout or targets is not None):
            raise LoraError("--lora-alpha, --lora-dropout and --lora-targets need --lora R (a rank >= 1)")
        settings = LoraSettings(r=lora, alpha=lora_alpha, dropout=lora_dropout, target_modules=targets) \
            if lora else None
        modes = {"auto": "auto", "on": True, "true": True, "off": False, "false": False}
        if bf16.lower() not in modes:
            raise FinetuneError(f"--bf16 must be auto, on or off, got {bf16!r}")
        bf16_mode = modes[bf16.lower()]
        if checkpoint_every is not None and checkpoint_dir is None:
            raise FinetuneError("--checkpoint-every needs --checkpoint-dir")
        spec, settings, config = check_options(
            loss=spec, steps=steps, lr=lr, lora=settings, batch_size=batch, grad_accum=grad_accum,
            weight_decay=weight_decay, max_grad_norm=max_grad_norm or None, seed=seed, bf16=bf16_mode,
            eval_every=eval_every, checkpoint_every=checkpoint_every, checkpoint_dir=checkpoint_dir,
            temperature=temperature, update=update, gradient_checkpointing=gradient_checkpointing)
        lr = config.lr
        if seq_len < 2 or eval_windows < 0:
            raise DataError("--seq-len must be >= 2 and --eval-windows >= 0.")
        if spec.needs_teacher and teacher is None:
            raise FinetuneError(f"--loss {spec} needs --teacher (the dense model: 'smollm2' or an HF folder); "
                                "or use --loss ce")
        check_data(data)
        src = Path(model_dir).expanduser()
        if not (src / MASKS_FILE).is_file():
            raise ModelError(f"{model_dir} has no {MASKS_FILE}: pass a folder written by `sparsetorch prune --out` "
                             "(the masks to preserve are read from it)")
        for m in (model_dir, teacher):
            limit = model_max_positions(m) if m is not None else None
            if limit is not None and seq_len > limit:
                raise ModelError(f"--seq-len {seq_len} is longer than {m!r} accepts ({limit} positions)")
        inputs = check_outputs(model_dir, out, json_path, overwrite)
        if teacher is not None and Path(teacher).expanduser().is_dir():
            from ..atomic import check_output_dir

            check_output_dir(out, inputs=[*inputs, Path(teacher).expanduser()], overwrite=overwrite)
            inputs.append(Path(teacher).expanduser())
        masks = MaskSet.load(src / MASKS_FILE)
        if settings is not None and targets is not None:
            # the modules to adapt must be pruned ones (their masked delta is the point)
            modules = [n.removesuffix(".weight") for n in masks.masks]
            for t in targets:
                if not any(m == t or m.endswith("." + t) for m in modules):
                    raise LoraError(f"--lora-targets {t!r} matches no pruned layer of {model_dir} (pruned: "
                                    f"{', '.join(sorted({m.rsplit('.', 1)[-1] for m in modules})[:8])})")

        _say(f"loading [bold]{escape(model_dir)}[/] ...")
        student, tok = load_causal_lm(model_dir, progress=True)
        masks.verify(student)  # the folder's weights must already obey its masks
        teacher_model = None
        if spec.needs_teacher:
            _say(f"loading teacher [bold]{escape(str(teacher))}[/] ...")
            teacher_model, _ = load_causal_lm(str(teacher), progress=True)
        train = load_text_windows(tok, data, seq_len)
        ew = make_eval_windows(tok, eval_windows, seq_len) if eval_windows else None
        _say(f"training data: {train.shape[0]} windows x {seq_len} tokens ({data}); "
             f"{steps} steps x {batch * grad_accum} windows; loss {spec}")
        sparsity_before = masks.sparsity().overall
        t0 = time.perf_counter()
        res = finetune(student, masks, train, teacher=teacher_model, loss=spec, steps=steps, lr=lr,
                       batch_size=batch, grad_accum=grad_accum, temperature=temperature, eval_windows=ew,
                       eval_every=eval_every, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                       resume=resume, weight_decay=weight_decay, max_grad_norm=max_grad_norm or None, bf16=bf16_mode,
                       gradient_checkpointing=gradient_checkpointing, seed=seed, lora=settings, update=update)
        seconds = time.perf_counter() - t0
        zeros = sum(int((p == 0).sum()) for n, p in student.named_parameters() if n in masks.masks)
        numel = sum(masks.masks[n].numel() for n in masks.masks)
        ppl_before = res.evals[0][1] if res.evals and res.evals[0][0] == 0 else None
        ppl_after = res.evals[-1][1] if res.evals else None
        result = {
            "model": model_dir, "teacher": teacher, "objective": str(spec), "steps": res.steps, "lr": lr,
            "batch": batch, "grad_accum": grad_accum, "seq_len": seq_len, "data": data,
            "ppl_before": ppl_before, "ppl_after": ppl_after,
            "sparsity_before": sparsity_before, "sparsity_after": zeros / max(numel, 1),
            "masks_sparsity_after": masks.sparsity().overall,
            "tokens": res.tokens, "seconds": seconds, "peak_rss_mb": _peak_rss_mb(),
            "loss_first": res.losses[0] if res.losses else None, "loss": res.final_loss,
            "evals": res.evals, "resumed_from": res.resumed_from, "bf16": res.bf16,
            "trainable_params": res.trainable_params,
            "update": None if update is None else str(config.adapter["update"]),
            # LoRA: the settings, and that the written model is the masked merge (no adapter files)
            "lora": None if settings is None else {**settings.to_dict(), "merged": True,
                                                   "written": "merged model (W + M * s*BA), no adapters"},
        }
        if ppl_before is not None:
            _say(f"perplexity before: [bold]{ppl_before:.3f}[/]")
        if ppl_after is not None:
            _say(f"perplexity after {res.steps} steps: [bold]{ppl_after:.3f}[/]")
        if settings is not None:
            _say(f"sparse LoRA r={settings.r} alpha={settings.lora_alpha:g}: {res.trainable_params} adapter "
                 "parameters trained, merged with the masks into the model")
        _say(f"{res.tokens} tokens in {seconds:.1f} s ({res.tokens / max(seconds, 1e-9):.0f} tokens/s); "
             f"masks verified, sparsity {sparsity_before:.4f} before, {masks.sparsity().overall:.4f} after")

        def extra(tmp: Path) -> None:
            masks.save(tmp / MASKS_FILE)
            full = {**result, "losses": res.losses, "grad_norms": res.grad_norms, "lrs": res.lrs}
            (tmp / "sparsetorch.json").write_text(json.dumps(full, indent=2, default=str), encoding="utf-8")

        saved = save_hf_model(student, tok, out, extra=extra, overwrite=overwrite, inputs=inputs)
        _say(f"saved the fine-tuned model folder with {MASKS_FILE} and sparsetorch.json to {escape(str(saved))}")
        write_json_summary(json_path, result, overwrite)

    @app.command("soup")
    def soup_cmd(
        models: list[str] = typer.Argument(..., help="Fine-tuned HF folders of one parent (each with masks.safetensors)."),
        out: Path = typer.Option(..., "--out", "-o", help="Write the soup HF folder (+ masks) here."),
        how: str = typer.Option("uniform", "--how", help="uniform (mean of all) or greedy (validation-driven)."),
        val: str = typer.Option("embedded", "--val", help="Greedy validation text: 'embedded' (calibration half) "
                                "or a text FILE. Never the evaluation text."),
        val_windows: int = typer.Option(16, "--val-windows", help="Validation windows (greedy)."),
        seq_len: int = typer.Option(512, "--seq-len"),
        json_path: Path | None = typer.Option(None, "--json", help="Also write the summary as JSON here."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder / --json file."),
    ) -> None:
        """Average fine-tuned children of one sparse parent (Sparse Model Soups); the soup keeps the masks."""
        import json

        from rich.markup import escape

        from ..analysis.report import MASKS_FILE
        from ..atomic import check_output_dir, check_output_file
        from ..cli import _say, write_json_summary
        from ..data.llm import load_causal_lm, save_hf_model
        from ..data.text import token_windows
        from ..errors import DataError, ModelError
        from ..evaluate import perplexity
        from ..masks import MaskSet
        from .soup import SoupError, soup

        if how not in ("uniform", "greedy"):
            raise SoupError(f"--how must be 'uniform' or 'greedy', got {how!r}")
        if seq_len < 2 or val_windows < 1:
            raise DataError("--seq-len must be >= 2 and --val-windows >= 1.")
        if how == "greedy":
            check_data(val)
        srcs = [Path(m).expanduser() for m in models]
        for m in srcs:
            if not (m / MASKS_FILE).is_file():
                raise ModelError(f"{m} has no {MASKS_FILE}: pass folders written by `sparsetorch finetune --out`")
        check_output_dir(out, inputs=srcs, overwrite=overwrite)
        if json_path is not None:
            check_output_file(json_path, inputs=srcs, overwrite=overwrite)
        masks = [MaskSet.load(m / MASKS_FILE) for m in srcs]
        loaded = [load_causal_lm(str(m), progress=False) for m in srcs]
        tok = loaded[0][1]
        val_fn = None
        if how == "greedy":
            from ..data.text import pydoc_topics_split

            text = pydoc_topics_split()[0] if val == "embedded" else Path(val).expanduser().read_text(encoding="utf-8")
            vw = token_windows(tok, text, seq_len=seq_len, max_windows=val_windows)

            def val_fn(model):  # noqa: ANN001, ANN202 - lower perplexity is better
                return perplexity(model, windows=vw, progress=False)

        res = soup([m for m, _ in loaded], how, val_fn, masks=masks, maximize=False)
        masks[0].verify(res.model)
        summary = {"models": [str(m) for m in srcs], "how": how, "used": [str(srcs[i]) for i in res.used],
                   "scores": res.scores, "soup_scores": res.soup_scores, "sparsity": masks[0].sparsity().overall}
        _say(f"{how} soup of {len(res.used)} of {len(srcs)} models; masks verified "
             f"(sparsity {masks[0].sparsity().overall:.4f})")

        def extra(tmp: Path) -> None:
            masks[0].save(tmp / MASKS_FILE)
            (tmp / "sparsetorch.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")

        saved = save_hf_model(res.model, tok, out, extra=extra, overwrite=overwrite, inputs=srcs)
        _say(f"saved the soup to {escape(str(saved))}")
        write_json_summary(json_path, summary, overwrite)
