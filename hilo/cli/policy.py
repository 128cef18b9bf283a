"""``hilo policy``: read and change the contact policy through the API.

hilo policy show
hilo policy set policy.yaml --note "weekly cap for win-back"
hilo policy history
hilo policy suppress email ana@example.com --reason "asked by phone"
"""

from __future__ import annotations

import getpass
import json
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
import yaml

from hilo.settings import Settings

policy_app = typer.Typer(
    help="Read and change the contact policy (Política de Contacto).", no_args_is_help=True
)

ApiOption = Annotated[
    str | None, typer.Option("--api", help="Hilo API base URL (default: from HILO_API_*).")
]


def _settings() -> Settings:
    try:
        return Settings()
    except Exception as error:
        typer.secho(f"settings: {error}", fg="red", err=True)
        raise typer.Exit(2) from None


def _request(method: str, path: str, api_url: str | None, **kwargs: Any) -> Any:
    """One call to the API with the admin token; exits with the API's explanation on error."""
    settings = _settings()
    url = api_url or f"http://{settings.api_host}:{settings.api_port}"
    try:
        with httpx.Client(
            base_url=url,
            headers={"Authorization": f"Bearer {settings.admin_token}"},
            timeout=httpx.Timeout(10.0, connect=3.0),
        ) as client:
            response = client.request(method, path, **kwargs)
    except httpx.HTTPError as error:
        typer.secho(f"could not reach Hilo at {url}: {error}", fg="red", err=True)
        raise typer.Exit(1) from None
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = response.text
        if isinstance(detail, list):  # validation problems: one line per field
            for problem in detail:
                if isinstance(problem, dict) and "field" in problem:
                    typer.secho(f"{problem['field']}: {problem['problem']}", fg="red", err=True)
                elif isinstance(problem, dict):
                    where = ".".join(str(part) for part in problem.get("loc", []))
                    typer.secho(f"{where}: {problem.get('msg')}", fg="red", err=True)
                else:
                    typer.secho(str(problem), fg="red", err=True)
        else:
            typer.secho(f"Hilo answered {response.status_code}: {detail}", fg="red", err=True)
        raise typer.Exit(1)
    return response.json() if response.content else None


@policy_app.command("show")
def show(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of YAML.")] = False,
    api_url: ApiOption = None,
) -> None:
    """The policy in force, with its version."""
    current = _request("GET", "/policy", api_url)
    if as_json:
        typer.echo(json.dumps(current, indent=2))
        return
    who = f" by {current['actor']} at {current['created_at']}" if current.get("actor") else ""
    typer.echo(f"# contact policy v{current['version']}{who}")
    if current.get("note"):
        typer.echo(f"# note: {current['note']}")
    typer.echo(yaml.safe_dump(current["policy"], sort_keys=False, allow_unicode=True).rstrip())


@policy_app.command("set")
def set_policy(
    file: Annotated[Path, typer.Argument(help="The whole policy, as YAML or JSON.")],
    note: Annotated[str | None, typer.Option("--note", "-n", help="Why, for the audit.")] = None,
    actor: Annotated[
        str | None, typer.Option("--actor", help="Who changes it (default: your user name).")
    ] = None,
    api_url: ApiOption = None,
) -> None:
    """Replace the policy with FILE; the change is audited as a new version."""
    if not file.is_file():
        typer.secho(f"{file}: no such file", fg="red", err=True)
        raise typer.Exit(2)
    try:
        document = yaml.safe_load(file.read_text())
    except yaml.YAMLError as error:
        typer.secho(f"{file}: not YAML or JSON: {error}", fg="red", err=True)
        raise typer.Exit(2) from None
    if not isinstance(document, dict):
        typer.secho(
            f"{file}: a policy is a mapping of rules (global, channels ...)", fg="red", err=True
        )
        raise typer.Exit(2)
    body = {"policy": document, "actor": actor or getpass.getuser(), "note": note}
    version = _request("PUT", "/policy", api_url, json=body)
    typer.echo(f"contact policy v{version['version']} by {version['actor']}: {version['summary']}")


@policy_app.command("history")
def history(
    limit: Annotated[int, typer.Option("--limit", help="How many versions.")] = 20,
    api_url: ApiOption = None,
) -> None:
    """Every version, newest first: who, when, why and what changed."""
    versions = _request("GET", "/policy/history", api_url, params={"limit": limit})
    if not versions:
        typer.echo("no policy set yet: the defaults apply")
    for version in versions:
        note = f" ({version['note']})" if version.get("note") else ""
        typer.echo(f"v{version['version']:<4} {version['created_at']}  {version['actor']}{note}")
        typer.echo(f"      {version['summary']}")


@policy_app.command("suppress")
def suppress(
    channel: Annotated[str, typer.Argument(help="email, sms, whatsapp, push ...")],
    address: Annotated[str, typer.Argument(help="The address no message may go to.")],
    reason: Annotated[str, typer.Option("--reason", "-r", help="Why.")] = "suppressed by hand",
    source: Annotated[str, typer.Option("--source", help="Where it comes from.")] = "cli",
    api_url: ApiOption = None,
) -> None:
    """Stop every send to ADDRESS on CHANNEL."""
    body = {"channel": channel, "address": address, "reason": reason, "source": source}
    row = _request("POST", "/policy/suppressions", api_url, json=body)
    typer.echo(f"suppressed {row['address']} on {row['channel']}: {row['reason']}")
