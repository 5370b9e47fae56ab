"""`lorafleet jobs list|status|logs|stop`: the Ray Jobs API of a cluster (jobs from `lorafleet submit`).

lorafleet jobs list --address http://ray-head:8265
lorafleet jobs status lorafleet-tiny-20250101-120000-ab12 --address http://ray-head:8265
lorafleet jobs logs JOB --follow          # RAY_API_SERVER_ADDRESS works instead of --address
lorafleet jobs stop JOB
"""

from __future__ import annotations

from datetime import UTC, datetime

import typer

from lorafleet.cli.submit import AddressOption

app = typer.Typer(help="Jobs on a Ray cluster: list, status, logs, stop.", no_args_is_help=True)
JobArg = typer.Argument(..., help="Job id (the Ray submission id printed by `lorafleet submit`).")


def _client(address: str | None):
    from lorafleet.jobs import RayJobs

    return RayJobs(address)


def _time(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


@app.command("list")
def list_jobs(address: str = AddressOption) -> None:
    """One line per job: id, status, lorafleet run id, start time (UTC), entrypoint."""
    rows = [("JOB", "STATUS", "RUN", "STARTED (UTC)", "ENTRYPOINT")]
    for info in _client(address).list():
        run = (info.metadata or {}).get("lorafleet.run_id", "-")
        entrypoint = info.entrypoint if len(info.entrypoint) <= 60 else info.entrypoint[:57] + "..."
        rows.append(
            (info.submission_id or info.job_id or "-", str(info.status.value), run, _time(info.start_time), entrypoint)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[4])


@app.command("status")
def status(job_id: str = JobArg, address: str = AddressOption) -> None:
    """Status, message, run id and times of one job."""
    info = _client(address).info(job_id)
    typer.echo(f"job {job_id}: {info.status.value}")
    if info.message:
        typer.echo(f"message: {info.message}")
    typer.echo(f"run: {(info.metadata or {}).get('lorafleet.run_id', '-')}")
    typer.echo(f"started: {_time(info.start_time)}  ended: {_time(info.end_time)}")
    typer.echo(f"entrypoint: {info.entrypoint}")


@app.command("logs")
def logs(
    job_id: str = JobArg,
    address: str = AddressOption,
    follow: bool = typer.Option(False, "--follow", "-f", help="Stream until the job ends; exit 1 unless it succeeded."),
) -> None:
    """Print a job's driver logs (all of them, or streamed with --follow)."""
    client = _client(address)
    if not follow:
        typer.echo(client.logs(job_id), nl=False)
        return
    final = client.follow(job_id)
    typer.echo(f"job {job_id} {final}")
    raise typer.Exit(0 if final == "SUCCEEDED" else 1)


@app.command("stop")
def stop(job_id: str = JobArg, address: str = AddressOption) -> None:
    """Ask Ray to stop a job (its workers are killed; the run folder keeps its last checkpoint)."""
    stopped = _client(address).stop(job_id)
    typer.echo(f"job {job_id}: {'stop requested' if stopped else 'not running (already finished)'}")
