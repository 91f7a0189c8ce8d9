"""``zray job submit|status|logs|stop|list``: Ray's job CLI over the dashboard's
HTTP API (zray/job_submission.py). ``--address`` is the dashboard's URL
(default: $ZRAY_DASHBOARD_ADDRESS, an http:// $RAY_ADDRESS, or http://127.0.0.1:8265)."""

from __future__ import annotations

import json
import sys

import click


def _client(address):
    from zray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, ValueError) as e:
        raise click.ClickException(str(e)) from None


def _json_option(text, name):
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise click.BadParameter(f"not JSON: {e}", param_hint=name) from None
    if not isinstance(value, dict):
        raise click.BadParameter("must be a JSON object", param_hint=name)
    return value


def _call(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, ConnectionError, ValueError) as e:
        raise click.ClickException(str(e)) from None


def _follow(c, sid) -> str:
    for chunk in _call(c.follow_logs, sid):
        click.echo(chunk, nl=False)
    return str(_call(c.get_job_status, sid))


address_option = click.option("--address", default=None,
                              help="The dashboard's address, e.g. http://127.0.0.1:8265.")


@click.group()
def job():
    """Submit and manage jobs (drivers run on the head by the dashboard)."""


@job.command(context_settings={"ignore_unknown_options": True})
@address_option
@click.option("--submission-id", default=None, help="The job's id (default: a new one).")
@click.option("--working-dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Local directory to upload; the entrypoint runs in it on the head.")
@click.option("--runtime-env-json", default=None, help="The job's runtime_env as JSON.")
@click.option("--metadata-json", default=None, help="Metadata (str to str) as JSON.")
@click.option("--no-wait", is_flag=True, help="Return once submitted; do not follow the logs.")
@click.argument("entrypoint", nargs=-1, type=click.UNPROCESSED, required=True)
def submit(address, submission_id, working_dir, runtime_env_json, metadata_json, no_wait,
           entrypoint):
    """Run ENTRYPOINT (after --) as a job: `zray job submit -- python script.py`."""
    import shlex

    runtime_env = _json_option(runtime_env_json, "--runtime-env-json") or {}
    if working_dir:
        runtime_env["working_dir"] = working_dir
    c = _client(address)
    sid = _call(c.submit_job, entrypoint=shlex.join(entrypoint), runtime_env=runtime_env,
                submission_id=submission_id,
                metadata=_json_option(metadata_json, "--metadata-json"))
    click.echo(f"Job '{sid}' submitted successfully", err=True)
    if no_wait:
        click.echo(f"  zray job logs {sid} --follow    zray job status {sid}", err=True)
        return
    status = _follow(c, sid)
    click.echo(f"Job '{sid}' {status}", err=True)
    if status != "SUCCEEDED":
        sys.exit(1)


@job.command()
@address_option
@click.argument("job_id")
def status(address, job_id):
    """Print a job's status."""
    info = _call(_client(address).get_job_info, job_id)
    click.echo(f"Status for job '{job_id}': {info.status}")
    if info.message:
        click.echo(f"Status message: {info.message}")


@job.command()
@address_option
@click.option("--follow", "-f", is_flag=True, help="Keep printing output until the job ends.")
@click.argument("job_id")
def logs(address, follow, job_id):
    """Print a job's output."""
    c = _client(address)
    if follow:
        _follow(c, job_id)
    else:
        click.echo(_call(c.get_job_logs, job_id), nl=False)


@job.command()
@address_option
@click.option("--no-wait", is_flag=True, help="Do not wait for the job to end.")
@click.argument("job_id")
def stop(address, no_wait, job_id):
    """Stop a running job."""
    import time

    c = _client(address)
    if not _call(c.stop_job, job_id):
        click.echo(f"Job '{job_id}' was not running", err=True)
        return
    click.echo(f"Stopping job '{job_id}'", err=True)
    while not no_wait:
        status = _call(c.get_job_status, job_id)
        if status.is_terminal():
            click.echo(f"Job '{job_id}' {status}", err=True)
            break
        time.sleep(0.2)


@job.command(name="list")
@address_option
def list_(address):
    """List the submitted jobs (JSON lines)."""
    from dataclasses import asdict

    for info in _call(_client(address).list_jobs):
        d = asdict(info)
        d["status"] = str(info.status)
        click.echo(json.dumps(d))
