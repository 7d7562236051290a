"""``sparsetorch run RECIPE.yaml``: a multi-stage recipe (prune -> finetune -> export ...) from
the shell; a thin layer over :func:`sparsetorch.stages.run_recipe`."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add the ``run`` command to the sparsetorch CLI."""

    @app.command("run")
    def run_cmd(
        recipe: Path = typer.Argument(..., help="A YAML run recipe: model, out, stages (see examples/recover_2of4.yaml)."),
        out: Path | None = typer.Option(None, "--out", "-o", help="Output folder (overrides the recipe's 'out:')."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder / --json file."),
        json_path: Path | None = typer.Option(None, "--json", help="Also write the run summary as JSON here."),
    ) -> None:
        """Run the stages of a recipe in order on one model; one line per stage, outputs in OUT/NN-stage."""
        from rich.markup import escape

        from .cli import _say, check_outputs, write_json_summary
        from .stages import plan_recipe, run_recipe, stage_line

        # the whole recipe and every output are checked before the model is loaded
        plan = plan_recipe(recipe, out=out, overwrite=overwrite)
        check_outputs(plan.model, plan.out, json_path, overwrite)
        names = ", ".join(s.name for s in plan.stages)
        _say(f"{escape(str(recipe))}: {escape(plan.model)}, {len(plan.stages)} stages ({names}) -> "
             f"{escape(str(plan.out))}")

        def on_stage(p, summary) -> None:  # noqa: ANN001
            _say(escape(stage_line(p, summary)))

        result = run_recipe(plan, progress=True, on_stage=on_stage)
        _say(f"done in {result.summary['seconds']:.1f} s; summary in {escape(str(plan.out / 'run.json'))}")
        write_json_summary(json_path, result.summary, overwrite)
