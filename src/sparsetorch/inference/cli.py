"""CLI: ``sparsetorch plan MODEL_OR_DIR``, ``sparsetorch bench inference --model DIR`` and
``sparsetorch generate DIR --prompt TEXT``."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def _bench_group(app: typer.Typer) -> typer.Typer:
    """The ``bench`` sub-app, created here unless another subpackage registered it first."""
    for info in app.registered_groups:
        if info.name == "bench" and info.typer_instance is not None:
            return info.typer_instance
    bench = typer.Typer(help="Benchmarks on this machine.", no_args_is_help=True)
    app.add_typer(bench, name="bench")
    return bench


def _check(prune: float | None, json_path: Path | None, overwrite: bool, **positive: int) -> None:
    """Validate the cheap arguments and the --json path before the model is loaded."""
    from ..errors import DataError, check_sparsity

    if prune is not None:
        check_sparsity(prune, "--prune")
    for name, value in positive.items():
        if value < 1:
            raise DataError(f"--{name.replace('_', '-')} must be >= 1, got {value}.")
    if json_path is not None:
        from ..atomic import check_output_file

        check_output_file(json_path, overwrite=overwrite)


def _load(model: str, prune: float | None):
    from ..data.llm import load_causal_lm

    lm, tok = load_causal_lm(model)
    if prune:
        from ..prune import prune as prune_model

        prune_model(lm, "magnitude", prune)
    return lm, tok


def _check_activation(activation_sparsity: float | None, criterion: str, allocation: str = "uniform") -> None:
    from ..activation import CRITERIA
    from ..activation.thresholds import ALLOCATIONS, check_sparsity_level
    from ..errors import MethodError

    if activation_sparsity is not None:
        check_sparsity_level(activation_sparsity)
    if criterion not in CRITERIA:
        raise MethodError(f"unknown --activation-criterion {criterion!r}; choose from {', '.join(CRITERIA)}.")
    if allocation not in ALLOCATIONS:
        raise MethodError(f"unknown --activation-allocation {allocation!r}; choose from {', '.join(ALLOCATIONS)}.")


def _thresholds(lm, tok, activation_sparsity: float | None, criterion: str,  # noqa: ANN001, ANN202
                allocation: str = "uniform"):
    """TEAL/WINA thresholds calibrated on 16 windows of the embedded calibration text (or None)."""
    if not activation_sparsity:
        return None
    from ..activation import calibrate_thresholds

    return calibrate_thresholds(lm, activation_sparsity, tokenizer=tok, criterion=criterion, num_samples=16,
                                seq_len=min(512, _max_len(lm)), allocation=allocation)


def _max_len(lm) -> int:  # noqa: ANN001
    return int(getattr(getattr(lm, "config", None), "max_position_embeddings", 512) or 512)


ALLOC_HELP = ("How the activation sparsity is spread: uniform (every projection the same level), greedy (TEAL's "
              "per-block search on the block output error) or greedy-global (also moves it between blocks by their "
              "cost to the next-token distribution; slower to calibrate, lower perplexity).")

ACT_HELP = ("Zero this fraction of every decoder Linear's inputs (TEAL thresholds calibrated on the embedded "
            "calibration text) and let kernels that skip zero inputs compete.")


def register(app: typer.Typer) -> None:
    """Add ``plan``, ``bench inference`` and ``generate`` to the ``sparsetorch`` app."""
    from rich.console import Console

    console = Console()
    _register_generate(app)

    @app.command("plan")
    def plan_cmd(
        model: str = typer.Argument(..., help="'smollm2' or a Hugging Face causal-LM folder (pruned or not)."),
        batch: int = typer.Option(1, "--batch", "-b", help="Rows per forward (tokens per step; 1 = token-by-token decode)."),
        prune: float | None = typer.Option(None, help="Magnitude-prune to this sparsity first (a what-if preview)."),
        min_sparsity: float = typer.Option(0.3, help="Layers sparser than this are measured with sparse kernels."),
        activation_sparsity: float | None = typer.Option(None, "--activation-sparsity", help=ACT_HELP),
        activation_criterion: str = typer.Option("teal", "--activation-criterion", help="teal (|x|) or wina "
                                                 "(|x| times the weight column's norm)."),
        activation_allocation: str = typer.Option("uniform", "--activation-allocation", help=ALLOC_HELP),
        save_thresholds: Path | None = typer.Option(
            None, "--save-thresholds", help="Write the calibrated activation thresholds to this file "
            "(safetensors; `sparsetorch generate --thresholds FILE` reads it)."),
        json_path: Path | None = typer.Option(None, "--json", help="Also write the plan as JSON."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --json / --save-thresholds file."),
    ) -> None:
        """Measure every Linear layer with each kernel; print expected latency, memory and speedup, and (batch 1, Llama-family models) the compiled decode engine's predicted tokens/s per weight dtype."""
        from ..errors import check_sparsity
        from . import plan as make_plan

        _check(prune, json_path, overwrite, batch=batch)
        check_sparsity(min_sparsity, "--min-sparsity")
        _check_activation(activation_sparsity, activation_criterion, activation_allocation)
        if save_thresholds is not None:
            from ..atomic import check_output_file
            from ..errors import DataError

            if not activation_sparsity:
                raise DataError("--save-thresholds needs --activation-sparsity S (the thresholds to calibrate).")
            check_output_file(save_thresholds, overwrite=overwrite)
        lm, tok = _load(model, prune)
        th = _thresholds(lm, tok, activation_sparsity, activation_criterion, activation_allocation)
        report = make_plan(lm, batch_size=batch, min_sparsity=min_sparsity, activation=th)
        typer.echo(str(report))
        if save_thresholds is not None and th is not None:
            th.save(save_thresholds, overwrite=overwrite)
            console.print(f"wrote {save_thresholds}", markup=False, highlight=False)
        if json_path is not None:
            from ..atomic import atomic_write_text

            atomic_write_text(json_path, json.dumps(report.to_dict(), indent=2) + "\n", overwrite=overwrite)
            console.print(f"wrote {json_path}", markup=False, highlight=False)

    bench = _bench_group(app)

    @bench.command("inference")
    def bench_inference(
        model: str = typer.Option("smollm2", "--model", "-m", help="'smollm2' or a Hugging Face causal-LM folder."),
        prune: float | None = typer.Option(None, help="Magnitude-prune to this sparsity first."),
        tokens: int = typer.Option(32, help="Tokens to decode per measurement."),
        activation_sparsity: float | None = typer.Option(None, "--activation-sparsity", help=ACT_HELP),
        activation_criterion: str = typer.Option("teal", "--activation-criterion", help="teal or wina."),
        activation_allocation: str = typer.Option("uniform", "--activation-allocation", help=ALLOC_HELP),
        json_path: Path | None = typer.Option(None, "--json", help="Also write the results as JSON."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --json file."),
        peer: str | None = typer.Option(None, "--peer", help="Also measure a peer runtime on the same dense model: "
                                        "'llamacpp' (llama.cpp through a pinned llama-cpp-python in its own venv; "
                                        "set it up once with `python -m sparsetorch.inference.peer_llamacpp setup`). "
                                        "Adds our compiled decode engine's tokens/s too."),
        peer_type: str = typer.Option("f32", "--peer-type", help="GGUF values of the peer's copy of the dense "
                                      "model: f32, f16, bf16 or q8_0 (converted by llama.cpp's convert_hf_to_gguf.py)."),
        peer_gguf: Path | None = typer.Option(None, "--peer-gguf", help="Run the peer on this GGUF file instead of "
                                              "converting the model."),
        peer_venv: Path | None = typer.Option(None, "--peer-venv", help="The peer's venv (default: "
                                              "$SPARSETORCH_LLAMACPP_VENV or ~/.cache/sparsetorch/llamacpp/venv)."),
        peer_cache: Path | None = typer.Option(None, "--peer-cache", help="Folder of llama.cpp's converter and the "
                                               "converted GGUFs (default: $SPARSETORCH_LLAMACPP_CACHE or "
                                               "~/.cache/sparsetorch/llamacpp)."),
    ) -> None:
        """Token-by-token decode speed: dense vs sparse kernels chosen by sparsify_for_inference (and, with --peer, our compiled decode engine and llama.cpp on the same model)."""
        import torch

        from . import sparsify_for_inference
        from .bench import decode_tokens_per_s, machine_info

        _check(prune, json_path, overwrite, tokens=tokens)
        _check_activation(activation_sparsity, activation_criterion, activation_allocation)
        if peer is not None:  # every peer problem is reported before the model is loaded
            _check_peer(peer, peer_type, peer_gguf, peer_venv, peer_cache, tokens)
        lm, tok = _load(model, None)
        gguf = None
        if peer is not None:
            gguf = peer_gguf or _peer_gguf(model, lm, tok, peer_type, peer_venv, peer_cache)
        if prune:
            from ..prune import prune as prune_model

            prune_model(lm, "magnitude", prune)
        ids = tok("The quick brown fox jumps over the lazy dog. Sparse networks", return_tensors="pt").input_ids
        th = _thresholds(lm, tok, activation_sparsity, activation_criterion, activation_allocation)
        measured = 0.0
        if th is not None:  # the fraction of inputs the thresholds zero, on the prompt
            from ..activation import apply_thresholds

            probe = apply_thresholds(lm, th)
            with torch.no_grad():
                lm(input_ids=ids, use_cache=False)
            measured = probe.measured_sparsity
            probe.remove()
        dense_tps = decode_tokens_per_s(lm, ids, tokens)
        report = sparsify_for_inference(lm, batch_size=1, activation=th)
        sparse_tps = decode_tokens_per_s(lm, ids, tokens)
        engine_tps: float | None = None
        engine_note: str | None = None
        peer_res: dict | None = None
        if peer is not None:
            engine_tps, engine_note = _engine_tps(lm, ids, tokens)
            from .peer_llamacpp import peer_decode

            peer_res = peer_decode(gguf, ids[0].tolist(), tokens, 3, threads=torch.get_num_threads(),  # type: ignore[arg-type]
                                   venv=peer_venv, cache=peer_cache)
            peer_res["gguf_type"] = None if peer_gguf is not None else peer_type
        info = machine_info()
        typer.echo(str(report))
        console.print(f"{'':<18} {'tokens/s':>9}")
        console.print(f"{'dense':<18} {dense_tps:>9.2f}")
        console.print(f"{'sparse':<18} {sparse_tps:>9.2f}   ({sparse_tps / dense_tps:.2f}x)")
        if peer_res is not None:
            label = "decode engine fp32"
            console.print(f"{label:<18} {engine_tps:>9.2f}" if engine_tps is not None else
                          f"{label:<18} {'-':>9}   ({engine_note})", markup=False, highlight=False)
            plabel = f"llama.cpp {(peer_res['gguf_type'] or Path(peer_res['gguf']).name).upper()}"
            console.print(f"{plabel:<18} {peer_res['decode_tokens_per_s']:>9.2f}   (dense model, llama-cpp-python "
                          f"{peer_res['llama_cpp_python']})", markup=False, highlight=False)
        console.print(
            f"torch threads {info['torch_threads']}, load average {info['loadavg_1_5_15'][0]:.2f}"
            + (" (machine shared with other work: timings are noisy)" if info["machine_shared"] else "")
        )
        if json_path is not None:
            from ..atomic import atomic_write_text

            res = {"model": model, "prune": prune, "tokens": tokens, "activation_sparsity": activation_sparsity or 0.0,
                   "activation_criterion": activation_criterion if activation_sparsity else None,
                   "activation_allocation": activation_allocation if activation_sparsity else None,
                   "activation_sparsity_measured": measured, "dense_tokens_per_s": dense_tps,
                   "sparse_tokens_per_s": sparse_tps, "machine": info, "sparsify": report.to_dict(),
                   "torch_version": torch.__version__}
            if peer_res is not None:
                res.update(engine_tokens_per_s=engine_tps, engine_note=engine_note,
                           peer_tokens_per_s=peer_res["decode_tokens_per_s"], peer=peer_res)
            atomic_write_text(json_path, json.dumps(res, indent=2) + "\n", overwrite=overwrite)
            console.print(f"wrote {json_path}", markup=False, highlight=False)


def _check_peer(peer: str, peer_type: str, gguf: Path | None, venv: Path | None, cache: Path | None,
                tokens: int) -> None:
    """The --peer options, and that the peer is set up (a DependencyError naming the setup command)."""
    from ..errors import DataError, MethodError, close_matches
    from .peer_llamacpp import GGUF_TYPES, PEERS, check_peer

    if peer not in PEERS:
        raise MethodError(f"unknown --peer {peer!r}; choose {', '.join(PEERS)}." + close_matches(peer, PEERS))
    if peer_type not in GGUF_TYPES:
        raise MethodError(f"unknown --peer-type {peer_type!r}; choose one of {', '.join(GGUF_TYPES)}."
                          + close_matches(peer_type, GGUF_TYPES))
    if gguf is not None and not gguf.is_file():
        raise DataError(f"--peer-gguf {gguf} is not a file.")
    if tokens < 2:
        raise DataError(f"--peer needs --tokens >= 2 (decode speed is timed from the first to the last new token), got {tokens}.")
    check_peer(venv, cache, converter=gguf is None)


def _peer_gguf(model: str, lm, tok, peer_type: str, venv: Path | None, cache: Path | None) -> Path:  # noqa: ANN001
    """The GGUF of the (unpruned) model for the peer: a Hugging Face folder is converted as it is;
    'smollm2' is first saved as a folder in the peer cache (once)."""
    from ..data.llm import MODEL_ALIASES, save_hf_model
    from .peer_llamacpp import default_cache, gguf_for_model

    if model.lower() in MODEL_ALIASES:
        folder = Path(cache or default_cache()) / "hf" / model.lower()
        if not (folder / "config.json").is_file():
            save_hf_model(lm, tok, folder, overwrite=True)
        return gguf_for_model(folder, peer_type, venv=venv, cache=cache, name=model.lower())
    return gguf_for_model(Path(model), peer_type, venv=venv, cache=cache)


def _engine_tps(lm, ids, tokens: int) -> tuple[float | None, str | None]:  # noqa: ANN001
    """Our compiled decode engine (fp32) on ``lm``, timed like the peer: median of 3 runs of the time
    from the first to the last new token; ``(None, reason)`` when the engine cannot run ``lm``."""
    from ..errors import DependencyError, ModelError
    from .decode import DecodeEngine
    from .plan import engine_decode_tokens_per_s

    try:
        eng = DecodeEngine.from_model(lm, "fp32")
    except (ModelError, DependencyError) as exc:
        return None, str(exc)
    return engine_decode_tokens_per_s(eng, ids, tokens, 3), None


def _load_any(model: str):  # noqa: ANN202
    """``(model, tokenizer)`` from 'smollm2', a Hugging Face folder, or a folder written by
    ``sparsetorch export`` (compressed checkpoint + config + tokenizer)."""
    from ..export.checkpoint import DEFAULT_FILENAME

    path = Path(model)
    if path.is_dir() and (path / DEFAULT_FILENAME).is_file():
        from ..export import load_hf

        tok = _checkpoint_tokenizer(path)
        lm, _ = load_hf(path)
        return lm.float().eval(), tok
    return _load(model, None)


def _is_checkpoint_dir(model: str) -> bool:
    from ..export.checkpoint import DEFAULT_FILENAME

    path = Path(model)
    return path.is_dir() and (path / DEFAULT_FILENAME).is_file()


def _checkpoint_tokenizer(path: Path):  # noqa: ANN202
    """The tokenizer saved beside a compressed checkpoint (``sparsetorch export`` writes it)."""
    from transformers import AutoTokenizer

    from ..errors import ModelError

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} has a compressed checkpoint but no readable tokenizer ({exc}); "
                         "export it with `sparsetorch export` so the tokenizer is saved beside it.") from exc


def _register_generate(app: typer.Typer) -> None:
    @app.command("generate")
    def generate_cmd(
        model: str = typer.Argument(..., help="'smollm2', a Hugging Face causal-LM folder (pruned or not) or a "
                                    "folder from `sparsetorch export` (int8 checkpoints included)."),
        prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue."),
        max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n", help="Tokens to generate at most."),
        dtype: str = typer.Option("fp32", "--dtype", help="Weight values: fp32, fp16, bf16 or int8 "
                                  "(per-row symmetric; pruned zeros stay exact). Compute is fp32."),
        head_dtype: str | None = typer.Option(None, "--head-dtype", help="LM head / embedding values (default: --dtype)."),
        sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy decoding."),
        temperature: float = typer.Option(1.0, help="Sampling temperature (with --sample)."),
        top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0 = all)."),
        top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (1 = off)."),
        seed: int = typer.Option(0, help="Random seed for --sample."),
        threads: int | None = typer.Option(None, "--threads", help="CPU threads (default: torch's, or 1 when other "
                                           "work keeps the cores busy: measured here, a second thread that shares "
                                           "its core with another process makes decoding slower, not faster)."),
        activation_sparsity: float | None = typer.Option(
            None, "--activation-sparsity", help="Zero this fraction of every decoder projection's inputs (TEAL "
            "thresholds calibrated on 16 windows of the embedded calibration text); the engine then reads only the "
            "weights of the live inputs."),
        activation_allocation: str = typer.Option("uniform", "--activation-allocation", help=ALLOC_HELP),
        thresholds: Path | None = typer.Option(
            None, "--thresholds", help="TEAL thresholds saved before (`sparsetorch plan --save-thresholds` or "
            "ActivationThresholds.save, calibrated on the "
            "float model) instead of --activation-sparsity; with a compressed checkpoint the engine reads it "
            "without building the float model."),
        dense_prompt: bool = typer.Option(
            False, "--dense-prompt", help="Run the prompt without the activation thresholds, only the new tokens "
            "with them: the same decode speed (thresholds save reads at one token per step only), less error. "
            "Needs the decode engine."),
    ) -> None:
        """Continue PROMPT with the compiled low-overhead decoder (sparse, fp16/bf16/int8 weights); a model it cannot run exactly falls back to transformers' generate (fp32 only) with a one-line notice."""
        import sys
        import time

        import torch

        from ..errors import DataError, DependencyError, ModelError
        from .decode import DecodeEngine, _check_sampling, generate
        from .lowbit import check_value_dtype

        check_value_dtype(dtype)
        if head_dtype is not None:
            check_value_dtype(head_dtype)
        if max_new_tokens < 1:
            raise DataError(f"--max-new-tokens must be >= 1, got {max_new_tokens}.")
        if threads is not None and threads < 1:
            raise DataError(f"--threads must be >= 1, got {threads}.")
        if sample:
            _check_sampling(temperature, top_k, top_p)
        if not prompt:
            raise DataError("--prompt is empty; give some text to continue.")
        _check_activation(activation_sparsity, "teal", activation_allocation)
        if dense_prompt and not activation_sparsity and thresholds is None:
            raise DataError("--dense-prompt goes with --activation-sparsity or --thresholds: without thresholds "
                            "every token runs dense already.")
        saved_th = None
        if thresholds is not None:
            if activation_sparsity:
                raise DataError("give --activation-sparsity (calibrate now) or --thresholds FILE (saved), not both.")
            from ..activation import ActivationThresholds

            saved_th = ActivationThresholds.load(thresholds)
            if saved_th.criterion != "teal":
                raise DataError(f"{thresholds} holds {saved_th.criterion!r} thresholds; the decode engine applies "
                                "TEAL ones (calibrate with criterion='teal').")
        from .kernels import machine_busy

        busy = threads is None and torch.get_num_threads() > 1 and machine_busy()
        before = torch.get_num_threads()
        if threads is not None or busy:
            torch.set_num_threads(1 if busy else threads)
        try:  # the thread count is process-wide: put it back (in-process callers, tests)
            lm = engine = th = None
            t0 = time.perf_counter()
            # the stored parts straight into the engine, no float model (thresholds need the model)
            if _is_checkpoint_dir(model) and not activation_sparsity:
                tok = _checkpoint_tokenizer(Path(model))
                t0 = time.perf_counter()
                try:
                    engine = DecodeEngine.from_checkpoint(model, dtype, head_dtype=head_dtype, activation=saved_th)
                    th = saved_th
                except (ModelError, DependencyError):
                    engine = None  # load the model: generate() falls back and says why
            if engine is None:
                lm, tok = _load_any(model)
            ids = tok(prompt, return_tensors="pt").input_ids
            if ids.shape[1] == 0:
                raise DataError("the prompt encodes to no tokens; give some text to continue.")
            if lm is not None:
                t0 = time.perf_counter()
                th = saved_th if saved_th is not None else _thresholds(lm, tok, activation_sparsity, "teal",
                                                                            activation_allocation)
                try:  # packing the weights is reported apart from generation
                    engine = DecodeEngine.from_model(lm, dtype, head_dtype=head_dtype, activation=th)
                except (ModelError, DependencyError):
                    engine = None  # generate() falls back and says why
                if engine is None and th is not None and dense_prompt:
                    raise ModelError("--dense-prompt needs the compiled decode engine, which cannot run this model; "
                                     "drop --dense-prompt (the fallback thresholds every token).")
            pack_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            gen = torch.Generator().manual_seed(seed) if sample else None
            if lm is None:
                assert engine is not None
                out = engine.generate(ids, max_new_tokens, do_sample=sample, temperature=temperature, top_k=top_k,
                                      top_p=top_p, generator=gen, eos_token_id=engine.eos_token_id,
                                      dense_prompt=dense_prompt)
            else:
                out = generate(lm, ids, max_new_tokens, dtype=dtype, head_dtype=head_dtype, do_sample=sample,
                               temperature=temperature, top_k=top_k, top_p=top_p, engine=engine, generator=gen,
                               dense_prompt=dense_prompt)  # refused above when the engine is missing
            secs = time.perf_counter() - t0
            used = torch.get_num_threads()
        finally:
            torch.set_num_threads(before)
        new = out[0, ids.shape[1]:]
        typer.echo(prompt + tok.decode(new, skip_special_tokens=True))
        packed = ((f"weights read from the checkpoint in {pack_s:.1f} s, " if lm is None else
                   f"{'thresholds calibrated and ' if th is not None and saved_th is None else ''}weights packed in "
                   f"{pack_s:.1f} s, ")
                  if engine is not None else "")
        act = (f", TEAL activation sparsity {th.sparsity:g}" + (", prompt dense" if dense_prompt else "")
               if th is not None else "")
        print(f"{new.numel()} tokens in {secs:.2f} s ({new.numel() / secs:.1f} tokens/s incl. prompt; {packed}"
              f"dtype {dtype}{act}, {used} threads" + (", machine busy)" if busy else ")"), file=sys.stderr)
