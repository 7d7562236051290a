"""``sparsetorch sae harvest | train | eval`` and ``sparsetorch diff``: thin layers over
:mod:`sparsetorch.dictionaries`."""

from __future__ import annotations

from pathlib import Path

import typer

sae_app = typer.Typer(help="Sparse autoencoders on a model's activations (harvest, train, eval).",
                      no_args_is_help=True)

_MODEL = "'smollm2' or a local Hugging Face causal-LM folder."
_SITE = "KIND:LAYER with KIND resid (residual stream after the block), mlp or attn (their outputs), e.g. resid:15."


def _check_common(seq_len: int, skip_first: int) -> None:
    from ..errors import DictionaryError

    if seq_len < 2:
        raise DictionaryError(f"--seq-len must be at least 2, got {seq_len}.")
    if not 0 <= skip_first < seq_len:
        raise DictionaryError(f"--skip-first must be in 0..{seq_len - 1}, got {skip_first}.")


def _harvest(model: str, site: str, tokens: int, out: Path, seq_len: int, skip_first: int, dtype: str,
             resume: bool, overwrite: bool):
    from ..cli import _say
    from ..data.llm import load_causal_lm
    from .harvest import corpus_windows, harvest
    from .sites import parse_site

    lm, tok = load_causal_lm(model, progress=True)
    st = parse_site(site, lm)
    import math

    windows = corpus_windows(tok, seq_len=seq_len, max_windows=math.ceil(tokens / (seq_len - skip_first)))
    if resume:
        windows = _keep_harvested_first(out, windows)
    _say(f"harvesting {tokens:,} tokens at {st} of {model} into {out}")
    return harvest(lm, windows, st, out, tokens=tokens, skip_first=skip_first, dtype=dtype, resume=resume,
                   overwrite=overwrite, model_names=[model], progress=True)


def _keep_harvested_first(out: Path, windows):
    """For ``--resume`` with a larger ``--tokens``: the windows already harvested in ``out`` first,
    in their order, then the new budget's other windows (the corpus read for a larger budget is
    shuffled differently, so its first windows are not the old ones)."""
    import torch

    from .harvest import _stored_windows

    old = _stored_windows(Path(out)) if Path(out).is_dir() else None
    if old is None or len(old) >= len(windows):
        return windows
    seen = {tuple(w.tolist()) for w in old}
    rest = [w for w in windows.to(torch.int32) if tuple(w.tolist()) not in seen]
    return torch.cat([old, torch.stack(rest)]) if rest else old


def register(app: typer.Typer) -> None:
    app.add_typer(sae_app, name="sae")
    register_diff(app)

    @sae_app.command("harvest")
    def harvest_cmd(
        model: str = typer.Option("smollm2", "--model", "-m", help=_MODEL),
        site: str = typer.Option(..., "--site", help=_SITE),
        tokens: int = typer.Option(..., "--tokens", help="Activations to harvest (whole windows are taken)."),
        out: Path = typer.Option(..., "--out", "-o", help="Folder for the activation shards."),
        seq_len: int = typer.Option(512, "--seq-len", help="Tokens per window."),
        skip_first: int = typer.Option(1, "--skip-first", help="Positions dropped at the start of every window "
                                       "(the attention sink)."),
        dtype: str = typer.Option("float16", "--dtype", help="Storage dtype: float16, bfloat16 or float32."),
        resume: bool = typer.Option(False, "--resume", help="Continue an interrupted harvest in --out, or extend a finished one to a larger --tokens."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder."),
    ) -> None:
        """Run the model over the training text up to SITE and stream its activations to disk
        (safetensors shards, resumable; never the evaluation half of the corpus)."""
        from ..cli import _say
        from ..errors import DictionaryError

        _check_common(seq_len, skip_first)
        if tokens < 1:
            raise DictionaryError(f"--tokens must be at least 1, got {tokens}.")
        man = _harvest(model, site, tokens, out, seq_len, skip_first, dtype, resume, overwrite)
        _say(f"{man.rows:,} activations of width {man.d} in {len(man.shards)} shards at {out}")

    @sae_app.command("train")
    def train_cmd(
        out: Path = typer.Option(..., "--out", "-o", help="Folder for the trained SAE."),
        model: str = typer.Option("smollm2", "--model", "-m", help=_MODEL),
        site: str | None = typer.Option(None, "--site", help=_SITE + " Needed unless --activations is given."),
        activations: Path | None = typer.Option(None, "--activations",
                                                help="A folder from `sae harvest` (default: harvest into "
                                                     "OUT.activations, resumable, kept for reuse)."),
        kind: str = typer.Option("topk", "--kind", help="topk, batchtopk or jumprelu."),
        k: int = typer.Option(32, "--k", help="Active latents per token (TopK), mean per token (BatchTopK), "
                              "target L0 (JumpReLU)."),
        width: int = typer.Option(4608, "--width", help="Number of latents."),
        tokens: int | None = typer.Option(None, "--tokens", help="Training tokens (default: all harvested)."),
        batch_size: int = typer.Option(4096, "--batch-size", help="Tokens per step."),
        lr: float | None = typer.Option(None, "--lr", help="Adam learning rate (default 2e-3 / sqrt(width / 2^14), held flat from 4,608 to 18,432 latents)."),
        auxk_alpha: float = typer.Option(1 / 32, "--auxk-alpha", help="Weight of the AuxK loss (0 turns it off)."),
        seq_len: int = typer.Option(512, "--seq-len", help="Tokens per window when harvesting."),
        skip_first: int = typer.Option(1, "--skip-first", help="Positions dropped per window when harvesting."),
        seed: int = typer.Option(0, "--seed"),
        checkpoint_every: int = typer.Option(0, "--checkpoint-every",
                                             help="Save the training state every N steps to OUT.train-state."
                                                  "safetensors (0: never)."),
        resume: bool = typer.Option(False, "--resume", help="Continue from OUT.train-state.safetensors (same "
                                    "options); the result equals an uninterrupted run."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder."),
    ) -> None:
        """Train a sparse autoencoder on a site's activations (harvesting them first if needed)."""
        from ..atomic import check_output_dir
        from ..cli import _say
        from ..errors import DictionaryError
        from .harvest import ActivationStore
        from .sae import SAEConfig
        from .train import TrainOptions, train_on_store

        _check_common(seq_len, skip_first)
        opts = TrainOptions(tokens=tokens, batch_size=batch_size, lr=lr, auxk_alpha=auxk_alpha, seed=seed)
        opts.check()
        SAEConfig(d=1, width=width, kind=kind, k=k).check()
        check_output_dir(out, overwrite=overwrite)
        if activations is None:
            if site is None:
                raise DictionaryError("pass --site (to harvest) or --activations (a folder from `sae harvest`).")
            if tokens is None:
                raise DictionaryError("pass --tokens: how many activations to harvest and train on.")
            activations = Path(str(out).rstrip("/") + ".activations")
            _harvest(model, site, tokens, activations, seq_len, skip_first, "float16",
                     resume=activations.exists(), overwrite=False)
        store = ActivationStore(activations)
        if site is not None and site != store.manifest.site:
            raise DictionaryError(f"--site {site} differs from the harvested site {store.manifest.site} in "
                                  f"{activations}.")
        cfg = SAEConfig(d=store.d, width=width, kind=kind, k=k, site=store.manifest.site,
                        model=store.manifest.models[0])
        if checkpoint_every < 0:
            raise DictionaryError(f"--checkpoint-every must be at least 0, got {checkpoint_every}.")
        state = Path(str(out).rstrip("/") + ".train-state.safetensors")
        if resume and not state.is_file():
            raise DictionaryError(f"--resume: there is no training state at {state} (train with "
                                  "--checkpoint-every N first).")
        if state.exists() and not resume and not overwrite:
            raise DictionaryError(f"{state} holds an unfinished run: pass --resume to continue it, or "
                                  "--overwrite to start again.")
        sae, res = train_on_store(store, cfg, opts, log=_say, checkpoint=state, checkpoint_every=checkpoint_every,
                                  resume=resume)
        sae.save(out, extra={"train": res.summary(), "activations": str(activations)}, overwrite=overwrite)
        state.unlink(missing_ok=True)  # the run finished: its state file (ours) is not needed any more
        _say(f"trained {kind} SAE ({width} latents, k={k}) on {res.tokens:,} tokens in {res.seconds:.0f} s "
             f"({res.tokens_per_s:.0f} tok/s): train FVU {res.final_fvu:.4f}, L0 {res.final_l0:.1f}; saved to {out}")

    @sae_app.command("eval")
    def eval_cmd(
        folder: Path = typer.Argument(..., help="A folder from `sae train`."),
        model: str | None = typer.Option(None, "--model", "-m", help="Override the model recorded with the SAE."),
        eval_windows: int = typer.Option(64, "--eval-windows", help="Windows of the evaluation half for FVU, L0 "
                                         "and dead latents."),
        lm_windows: int = typer.Option(16, "--lm-windows", help="Windows for the spliced LM losses (E16)."),
        seq_len: int = typer.Option(512, "--seq-len", help="Tokens per window."),
        skip_first: int = typer.Option(1, "--skip-first", help="Positions left out at the start of every window."),
        json_path: Path | None = typer.Option(None, "--json", help="Write the metrics as JSON here."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --json file."),
    ) -> None:
        """FVU, L0, dead fraction, shrinkage, delta LM loss and CE recovered on the evaluation half."""
        from ..atomic import check_output_file
        from ..cli import _say, write_json_summary
        from ..data.llm import load_causal_lm
        from ..data.text import eval_windows as make_windows
        from ..errors import DictionaryError
        from .metrics import evaluate_sae
        from .sae import SparseAutoencoder
        from .sites import parse_site

        _check_common(seq_len, skip_first)
        if eval_windows < 1 or lm_windows < 1:
            raise DictionaryError("--eval-windows and --lm-windows must be at least 1.")
        if json_path is not None:
            check_output_file(json_path, overwrite=overwrite)
        sae = SparseAutoencoder.load(folder)
        name = model or sae.cfg.model
        if not name:
            raise DictionaryError(f"{folder} does not record its model; pass --model.")
        lm, tok = load_causal_lm(name, progress=True)
        st = parse_site(sae.cfg.site, lm)
        windows = make_windows(tok, eval_windows, seq_len)
        m = evaluate_sae(sae, lm, st, windows, lm_windows=windows[:lm_windows], skip_first=skip_first)
        _say(f"{sae.cfg.kind} SAE at {st}: FVU {m['fvu']:.4f}, L0 {m['l0']:.1f}, dead {m['dead_fraction']:.3f}, "
             f"delta LM loss {m['delta_lm_loss']:.4f} nats, CE recovered {m['ce_recovered']:.4f} "
             f"({m['tokens']:,} tokens)")
        write_json_summary(json_path, {"folder": str(folder), "model": name, "site": str(st),
                                       "kind": sae.cfg.kind, "width": sae.cfg.width, "k": sae.cfg.k, **m},
                           overwrite)


def register_diff(app: typer.Typer) -> None:
    @app.command("diff")
    def diff_cmd(
        a: str = typer.Option("smollm2", "--a", help="Model A (e.g. the dense model): " + _MODEL),
        b: str = typer.Option(..., "--b", help="Model B (A pruned or fine-tuned): a Hugging Face folder."),
        site: str = typer.Option("resid:15", "--site", help=_SITE),
        out: Path = typer.Option(..., "--out", "-o", help="Folder for the crosscoder and the report."),
        tokens: int = typer.Option(500_000, "--tokens", help="Paired activations to train the crosscoder on."),
        width: int = typer.Option(4608, "--width", help="Crosscoder latents."),
        k: int = typer.Option(32, "--k", help="Mean active latents per token (BatchTopK)."),
        kind: str = typer.Option("batchtopk", "--kind", help="batchtopk (Minder et al.) or l1 (Anthropic)."),
        activations: Path | None = typer.Option(None, "--activations", help="Paired harvest folder (default "
                                                "OUT.activations; resumable, kept for reuse)."),
        eval_windows: int = typer.Option(16, "--eval-windows", help="Evaluation-half windows for Latent Scaling."),
        nu_cutoff: float = typer.Option(0.2, "--nu-cutoff", help="A latent is lost/gained when its nu (error "
                                        "target) is below this."),
        batch_size: int = typer.Option(4096, "--batch-size", help="Tokens per crosscoder step."),
        seq_len: int = typer.Option(512, "--seq-len", help="Tokens per window."),
        skip_first: int = typer.Option(1, "--skip-first", help="Positions dropped per window (attention sink)."),
        json_path: Path | None = typer.Option(None, "--json", help="Also write the report JSON here."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder / --json file."),
    ) -> None:
        """Crosscoder between two models (a model and its pruned or fine-tuned version): latents
        lost / gained / shared, a delta-norm histogram (PNG) and top contexts (HTML)."""
        import math

        from ..atomic import check_output_dir, check_output_file
        from ..cli import _say, write_json_summary
        from ..data.llm import load_causal_lm
        from ..data.text import eval_windows as make_windows
        from ..errors import DictionaryError
        from .crosscoder import CrosscoderConfig
        from .diff import diff_models
        from .harvest import corpus_windows
        from .sites import parse_site

        _check_common(seq_len, skip_first)
        CrosscoderConfig(d=1, width=width, kind=kind, k=k).check()
        if tokens < batch_size or eval_windows < 1 or not nu_cutoff > 0:
            raise DictionaryError("--tokens must be at least --batch-size, --eval-windows >= 1, --nu-cutoff > 0.")
        check_output_dir(out, overwrite=overwrite)
        if json_path is not None:
            check_output_file(json_path, overwrite=overwrite)
        ma, tok = load_causal_lm(a, progress=True)
        mb, _ = load_causal_lm(b, progress=True)
        st = parse_site(site, ma)
        parse_site(st, mb)
        train_w = corpus_windows(tok, seq_len=seq_len, max_windows=math.ceil(tokens / (seq_len - skip_first)))
        rep = diff_models(ma, mb, tok, st, out, train_windows=train_w, eval_windows=make_windows(tok, eval_windows,
                          seq_len), tokens=tokens, width=width, k=k, kind=kind, names=(a, b),
                          activations=activations, skip_first=skip_first, batch_size=batch_size, nu_cutoff=nu_cutoff,
                          overwrite=overwrite, log=_say)
        c = rep["counts"]
        _say(f"{width} latents: only in A {c['only_a']}, only in B {c['only_b']}, shared {c['shared']}, other "
             f"{c['other']}; Latent Scaling confirms lost {c['lost']}, gained {c['gained']} (nu < {nu_cutoff}). "
             f"Crosscoder FVU A {rep['eval']['fvu_a']:.3f}, B {rep['eval']['fvu_b']:.3f}. Report in {out}")
        write_json_summary(json_path, rep, overwrite)
