"""`probe` and `analyze`: heads and analyses on cached features (coming in later issues).

    probe --help
    analyze --help
"""

import typer

probe_app = typer.Typer(
    help="Train heads (linear, attention, DifFormer, DifFeed) on features cached by `extract run`. "
         "No commands yet: the linear probe is the next issue.",
    add_completion=False,
)
analyze_app = typer.Typer(
    help="Analyse cached features (CKA across blocks, timesteps and models). "
         "No commands yet: `analyze cka` is a later issue.",
    add_completion=False,
)


@probe_app.callback(invoke_without_command=True)
def _probe(ctx: typer.Context):
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())


@analyze_app.callback(invoke_without_command=True)
def _analyze(ctx: typer.Context):
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())


def probe_main():
    probe_app(prog_name="probe")


def analyze_main():
    analyze_app(prog_name="analyze")
