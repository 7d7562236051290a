"""``sparsetorch train-lm``: a small causal LM trained sparse on N local processes."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("train-lm")
    def train_lm_cmd(
        nproc: int = typer.Option(2, "--nproc", help="Processes (ranks) on this machine, joined by gloo."),
        comm: str = typer.Option("ddp", "--comm", help="ddp, topk:DENSITY, topk-adam:DENSITY, powersgd:RANK, diloco:H or sparseloco:H."),
        method: str = typer.Option("none", "--method", help="Training method (rigl, set, snfs, gmp, static ...) or none."),
        sparsity: float = typer.Option(0.9, "--sparsity", help="Target sparsity of the method."),
        steps: int = typer.Option(200, "--steps", help="Optimizer steps per rank."),
        seq_len: int = typer.Option(64, "--seq-len", help="Bytes per training window."),
        batch: int = typer.Option(8, "--batch", help="Windows per rank per step."),
        lr: float = typer.Option(1e-3, "--lr", help="AdamW learning rate (the inner one with diloco/sparseloco; with topk-adam the lr of the SGD that applies the ranks' mean Adam step)."),
        update_every: int = typer.Option(25, "--update-every", help="Steps between mask updates (rigl, set, snfs)."),
        outer_lr: float | None = typer.Option(None, "--outer-lr", help="diloco/sparseloco: the outer step's "
                                              "learning rate (default DiLoCo 0.7, SparseLoCo 1.0)."),
        outer_density: float | None = typer.Option(None, "--outer-density", help="sparseloco: fraction of each "
                                                   "chunk sent per outer step (default 64/4096)."),
        seed: int = typer.Option(0, "--seed"),
        timeout: float = typer.Option(1800.0, "--timeout", help="Kill the run after this many seconds."),
        checkpoint_every: int = typer.Option(0, "--checkpoint-every", help="Checkpoint every N steps (0: never)."),
        checkpoint_dir: Path | None = typer.Option(None, "--checkpoint-dir", help="Per-rank checkpoints go here."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint, if there is one."),
        json_path: Path | None = typer.Option(None, "--json", help="Write the run's JSON here."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --json file."),
    ) -> None:
        """Train a tiny byte-level Llama on the embedded text across --nproc processes, sparse.

        JSON: final_eval_loss, bytes_sent_per_rank, steps, tokens, seconds, masks_consistent.
        For several machines use torchrun -m sparsetorch.distributed.train (docs/distributed.md).
        """
        from ..atomic import check_output_file
        from ..cli import _say, write_json_summary
        from .train import TrainLMConfig, check_config, train_lm

        cfg = check_config(TrainLMConfig(nproc=nproc, comm=comm, method=method, sparsity=sparsity, steps=steps,
                                         seq_len=seq_len, batch=batch, lr=lr, update_every=update_every, seed=seed,
                                         outer_lr=outer_lr, outer_density=outer_density,
                                         timeout_s=timeout, checkpoint_every=checkpoint_every,
                                         checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir),
                                         resume=resume))
        if json_path is not None:
            check_output_file(json_path, overwrite=overwrite)
        result = train_lm(cfg)
        _say(f"{cfg.comm} on {cfg.nproc} ranks, method {cfg.method}: eval loss {result['final_eval_loss']:.4f}, "
             f"{result['bytes_sent_per_rank'][0]} bytes sent per rank, {result['tokens']} tokens, "
             f"{result['seconds']:.1f} s" + (", masks identical on every rank" if result["masks_consistent"] else ""))
        write_json_summary(json_path, result, overwrite)
