"""`analyze`: analyses of features cached by `extract run` (CKA: a later issue).

A thin typer layer over library functions; errors a user can fix print one line and exit with code 2.
"""

from __future__ import annotations

import typer

analyze_app = typer.Typer(
    help="Analyse cached features (CKA across blocks, timesteps and models). "
         "No commands yet: `analyze cka` is a later issue.",
    add_completion=False,
)


@analyze_app.callback(invoke_without_command=True)
def _analyze(ctx: typer.Context):
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())


def analyze_main():
    analyze_app(prog_name="analyze")
