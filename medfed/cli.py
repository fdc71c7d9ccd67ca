"""The `medfed` command line (Typer). Thin: it parses options, calls the rooms, renders.

Every command that reports takes `--json` and then prints one JSON document on
stdout; logs go to stderr. Exit codes: 0 ok, 1 the checked thing is wrong, 2 usage.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from medfed.ask_cli import ask
from medfed.bench_cli import bench_app

# The shared helpers keep their short private names here, where every command uses them.
from medfed.cli_common import fail as _fail
from medfed.cli_common import guard as _guard
from medfed.cli_common import metric_name as _metric_name
from medfed.cli_common import round_table as _round_table
from medfed.cli_common import site_config as _site_config
from medfed.cli_common import stderr, stdout
from medfed.cli_common import warn as _notify
from medfed.errors import MedfedError
from medfed.model_cli import model_app
from medfed.round_cli import round_app
from medfed.site_cli import add_check_command
from medfed.site_daemon import site_app

app = typer.Typer(
    name="medfed",
    help="Federated learning for hospital consortia, with differential privacy, over Flower.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@app.command()
def demo(
    sites: Annotated[int, typer.Option(min=1, max=64, help="Number of hospitals.")] = 3,
    rounds: Annotated[int, typer.Option(min=1, max=1000, help="Number of rounds.")] = 3,
    epsilon: Annotated[
        float,
        typer.Option(
            min=0.1, max=10.0, help="Epsilon the study asks of each site over all its rounds."
        ),
    ] = 3.0,
    local_steps: Annotated[
        int,
        typer.Option(
            "--local-steps", min=1, max=10_000, help="DP-SGD steps per site and round (at most)."
        ),
    ] = 30,
    simulation: Annotated[
        bool,
        typer.Option("--simulation", help="Run the sites on Flower's simulation runtime (Ray)."),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout.")
    ] = False,
    keep: Annotated[bool, typer.Option("--keep", help="Keep the demo's files and logs.")] = False,
    example: Annotated[
        str | None,
        typer.Option(
            "--example",
            help="Train an example study of examples/consortium (lung, breast, freesolv, amp)"
            " on its own sites instead of synthetic hospitals.",
        ),
    ] = None,
    no_secure_aggregation: Annotated[
        bool,
        typer.Option(
            "--no-secure-aggregation",
            help="Weaker privacy, for benchmarks only: the coordinator sees each site's update"
            " (warned loudly).",
        ),
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log progress to stderr.")
    ] = False,
    ask_query: Annotated[
        Path | None,
        typer.Option(
            "--ask",
            help="Ask this query (a `medfed ask` TOML) of the demo's sites instead of"
            " training; the demo plays each site's officer and approves it.",
            dir_okay=False,
        ),
    ] = None,
) -> None:
    """Run a real federation on loopback: TLS SuperLink, one SuperNode per site, DP-SGD, FedAvg."""
    import time

    from medfed.coordinator.results import RunResults
    from medfed.demo import DemoOptions, run_demo

    _setup_logging(verbose)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        options = DemoOptions(
            sites=sites,
            rounds=rounds,
            simulation=simulation,
            keep=keep,
            target_epsilon=epsilon,
            local_steps=local_steps,
            example=example,
            secure_aggregation=not no_secure_aggregation,
        )
    except ValueError as exc:
        _fail(str(exc), 2)
    if ask_query is not None:
        _demo_ask(options, ask_query, as_json=as_json)
        return
    started = time.monotonic()
    show_bar = stderr.is_terminal and not as_json
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=stderr,
        disable=not show_bar,
        transient=False,
    )
    task = bar.add_task("rounds", total=rounds)

    def progress(results: RunResults) -> None:
        bar.update(task, completed=results.rounds_completed)

    if show_bar:
        where = "Flower's simulation runtime" if simulation else "TLS, one SuperNode per site"
        stderr.print(f"medfed demo: {sites} sites, {rounds} rounds ({where}); starting ...")
    try:
        with bar:
            results = run_demo(options, progress, notify=_notify)
    except MedfedError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted; every process the demo started was stopped", 130)
    wall_s = round(time.monotonic() - started, 2)
    if as_json:
        document = results.to_json()
        summary = {
            "run_id": document["run_id"],
            "rounds_completed": document["rounds_completed"],
            "sites": document["sites"],
            "per_round": document["per_round"],
            "signed_updates": document["signed_updates"],
            "initial_loss": document["initial_loss"],
            "initial_metric": document["initial_metric"],
            "metric_name": _metric_name(results),
            "figures": document["figures"],
            "secure_aggregation": options.secure_aggregation,
            "wall_s": wall_s,
        }
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        stdout.print(_round_table(results))
        stdout.print(f"finished in {wall_s:.1f} s", highlight=False)


def _demo_ask(options: object, query_toml: Path, *, as_json: bool) -> None:
    from dataclasses import replace

    from medfed.ask_cli import print_answers
    from medfed.asks import load_query_file
    from medfed.demo import DemoOptions, run_demo_ask

    assert isinstance(options, DemoOptions)
    query = _guard(lambda: load_query_file(query_toml))
    try:
        record = run_demo_ask(replace(options, keep=True), query, notify=_notify)
    except MedfedError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted; every process the demo started was stopped", 130)
    if as_json:
        sys.stdout.write(json.dumps(record, default=str) + "\n")
    else:
        print_answers(record)
    if record.get("status") != "completed":
        raise typer.Exit(1)


budget_app = typer.Typer(
    help="The privacy officer's commands: budgets spent, approvals, signed-record checks.",
    no_args_is_help=True,
)
app.add_typer(budget_app, name="budget")

SiteToml = Annotated[
    Path, typer.Argument(help="The site's site.toml.", exists=False, dir_okay=False)
]


@budget_app.command("show")
def budget_show(
    site_toml: SiteToml,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout.")
    ] = False,
) -> None:
    """Epsilon spent per dataset against the cap, per study and run; exit 1 if any cap is
    exceeded or a ledger row fails its signature check."""
    from medfed.budget import budget_summary

    summary = _guard(lambda: budget_summary(_site_config(site_toml)))
    if as_json:
        sys.stdout.write(json.dumps(summary.to_json()) + "\n")
    else:
        table = Table(title=f"privacy budget of {summary.site_id} (delta {summary.delta:g})")
        for column in ("dataset", "study", "epsilon", "approved", "cap", "remaining", "runs"):
            table.add_column(column)
        for budget in summary.datasets:
            table.add_row(
                Text(budget.dataset[:16]), "(all studies)", f"{budget.epsilon_spent:.3f}", "",
                f"{budget.epsilon_cap:g} ({budget.window})", f"{budget.remaining:.3f}", "",
            )  # fmt: skip
            for spend in budget.studies:
                table.add_row(
                    "", Text(spend.study), f"{spend.epsilon:.3f}",
                    "" if spend.approved_epsilon is None else f"{spend.approved_epsilon:g}",
                    "", "", Text(", ".join(f"{r}: {n}" for r, n in spend.runs.items())),
                )  # fmt: skip
        stdout.print(table)
        for budget in summary.datasets:
            stdout.print(Text(f"{budget.dataset[:16]}: {budget.carries_over}"))
            stdout.print(
                Text(
                    f"  lifetime epsilon {budget.lifetime_spent:.3f} of {budget.lifetime_cap:g}"
                    f" (never resets); neighbouring datasets: {budget.relation}"
                )
            )
            for note in budget.no_guarantee:
                stderr.print(Text(f"  NO GUARANTEE: {note}"))
        stdout.print(
            f"{summary.ledger_rows} ledger rows, signatures "
            + ("verified" if not summary.ledger_problems else "FAILED"),
            highlight=False,
        )
        for problem in summary.ledger_problems:
            stderr.print(Text(f"ledger: {problem}"))
    if summary.audit_problem is not None:
        stderr.print(Text(f"audit log: {summary.audit_problem}"))
    for problem in summary.records_problems:
        stderr.print(Text(f"records cut or deleted: {problem}"))
    if not summary.verified or any(b.exceeded for b in summary.datasets):
        raise typer.Exit(1)


@budget_app.command("approve")
def budget_approve(
    site_toml: SiteToml,
    study: Annotated[
        Path,
        typer.Option("--study", help="The study's study.toml, or a query's TOML (`medfed ask`)."),
    ],
    epsilon: Annotated[float, typer.Option("--epsilon", help="Epsilon approved for the study.")],
    officer_key: Annotated[
        Path, typer.Option("--officer-key", help="The officer's Ed25519 private key (PEM).")
    ],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout.")
    ] = False,
) -> None:
    """Record the officer's signed approval of a study at this site, up to EPSILON."""
    from medfed.budget import approve_study

    approval = _guard(
        lambda: approve_study(site_toml, study, epsilon=epsilon, officer_key=officer_key)
    )
    if as_json:
        sys.stdout.write(json.dumps(approval) + "\n")
    else:
        stdout.print(
            Text(
                f"approved study {approval['study']} ({str(approval['study_sha256'])[:16]}) at"
                f" {approval['site_id']} up to epsilon {approval['epsilon']:g}"
            )
        )


@budget_app.command("keygen")
def budget_keygen(
    out: Annotated[
        Path, typer.Option("--out", help="Where to write the officer's private key (PEM).")
    ],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout.")
    ] = False,
) -> None:
    """Make the privacy officer's Ed25519 key pair: OUT (private, mode 0600; keep it off
    the site's servers) and OUT with .pub (the public half, for site.toml's
    officer_public_key). An existing key is never replaced."""
    from medfed.privacy.signing import SigningKey

    public_path = out.with_suffix(".pub")

    def make() -> SigningKey:
        from medfed.privacy.errors import KeyFileError

        if public_path.exists():
            raise KeyFileError(f"{public_path}: already exists; refusing to replace a key")
        key = SigningKey.generate()
        key.save(out)
        key.public.save(public_path)
        return key

    key = _guard(make)
    if as_json:
        document = {"private_key": str(out), "public_key": str(public_path)}
        sys.stdout.write(json.dumps({**document, "key_id": key.public.key_id}) + "\n")
    else:
        stdout.print(
            Text(
                f"wrote {out} (SECRET, mode 0600) and {public_path} (key id"
                f" {key.public.key_id}); copy {public_path.name} to the site and name it"
                " as officer_public_key in site.toml"
            ),
            soft_wrap=True,
        )


@budget_app.command("report")
def budget_report(
    site_toml: SiteToml,
    out: Annotated[Path, typer.Option("--out", help="Where to write the HTML report.")],
) -> None:
    """Write the officer's HTML report: epsilon over time per dataset and study, approvals,
    runs, and the check of every ledger signature; exit 1 if a check fails."""
    from medfed.budget import write_report

    summary = _guard(lambda: write_report(_site_config(site_toml), out))
    stdout.print(Text(f"wrote {out}"))
    for problem in summary.ledger_problems:
        stderr.print(Text(f"ledger: {problem}"))
    if summary.audit_problem is not None:
        stderr.print(Text(f"audit log: {summary.audit_problem}"))
    for problem in summary.records_problems:
        stderr.print(Text(f"records cut or deleted: {problem}"))
    if not summary.verified or any(b.exceeded for b in summary.datasets):
        raise typer.Exit(1)


audit_app = typer.Typer(
    help="Check medfed's signed, hash-chained audit logs.", no_args_is_help=True
)
app.add_typer(audit_app, name="audit")


@audit_app.command("verify")
def audit_verify(
    path: Annotated[Path, typer.Argument(help="The audit log (JSON lines).")],
    key: Annotated[
        Path,
        typer.Option(
            "--key",
            help="The public key (PEM) of whoever signs the log, or a site.toml whose site's"
            " signing key signs it.",
        ),
    ],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout.")
    ] = False,
) -> None:
    """Check every entry's signature and the hash chain, and that no tail was cut (the
    signed heads kept elsewhere; for a site, the ledger cross-checked); name the first bad
    entry or the cut (exit 1)."""
    from medfed.audit_check import check_audit

    check = _guard(lambda: check_audit(path, key))
    first_bad = check.first_bad
    if as_json:
        document = {
            "path": str(path),
            "entries_checked": check.entries_checked,
            "verified": check.ok,
            "first_bad": None
            if first_bad is None
            else {"line": first_bad[0], "reason": first_bad[1]},
            "problems": check.problems,
            "last_hash": check.last_hash,
        }
        sys.stdout.write(json.dumps(document) + "\n")
    elif check.ok:
        stdout.print(Text(f"{path}: {check.entries_checked} entries verified"))
    if not check.ok:
        if not as_json:
            if first_bad is not None:
                stderr.print(Text(f"{path}: line {first_bad[0]}: {first_bad[1]}"))
            for problem in check.problems:
                stderr.print(Text(f"{path}: {problem}"), soft_wrap=True)
        raise typer.Exit(1)


ConsortiumToml = Annotated[
    Path, typer.Argument(help="The consortium's consortium.toml.", dir_okay=False)
]
PkiDir = Annotated[
    Path, typer.Option("--pki", help="The folder `medfed provision --out` wrote.", file_okay=False)
]


@app.command()
def provision(
    consortium_toml: ConsortiumToml,
    out: Annotated[
        Path, typer.Option("--out", help="Where to write the CA, SuperLink and site kits.")
    ],
    add_site: Annotated[
        list[str] | None,
        typer.Option(
            "--add-site",
            help="Only add this site's kit (listed in consortium.toml), reusing the CA.",
        ),
    ] = None,
    renew: Annotated[
        bool,
        typer.Option("--renew", help="Only re-issue the SuperLink's certificate, same CA."),
    ] = False,
    renew_identity: Annotated[
        list[str] | None,
        typer.Option(
            "--renew-identity",
            help="Only re-issue this site's identity certificate (secure aggregation), same CA"
            " and key.",
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout.")
    ] = False,
) -> None:
    """Issue the consortium CA, the SuperLink's TLS certificate and one startup kit per
    site; never re-issues (a second run is refused unless it only adds sites or renews
    the SuperLink's certificate)."""
    from medfed.coordinator.consortium import load_consortium
    from medfed.lifecycle import Renewed, renew_superlink
    from medfed.lifecycle import renew_identity as renew_identity_of
    from medfed.provision import PkiLayout
    from medfed.provision import provision as run_provision

    if renew_identity:
        if add_site or renew:
            _fail("--renew-identity does one thing: run --renew and --add-site separately", 2)
        config = _guard(lambda: load_consortium(consortium_toml))
        layout = PkiLayout(out)

        def renew_all() -> list[Renewed]:
            return [renew_identity_of(config, layout, site) for site in renew_identity or ()]

        issued = _guard(renew_all)
        if as_json:
            sys.stdout.write(json.dumps([item.to_json() for item in issued]) + "\n")
        for item in [] if as_json else issued:
            stdout.print(
                Text(f"{item.cert} renewed, valid until {item.not_valid_after}; copy it into"
                     " the site's kit"), soft_wrap=True,
            )  # fmt: skip
        return
    if renew:
        if add_site:
            _fail("--renew and --add-site do one thing each: run them separately", 2)
        renewed = _guard(lambda: renew_superlink(load_consortium(consortium_toml), PkiLayout(out)))
        if as_json:
            sys.stdout.write(json.dumps(renewed.to_json()) + "\n")
        else:
            stdout.print(
                Text(f"SuperLink: {renewed.cert} renewed, valid until {renewed.not_valid_after};"
                     " restart the coordinator to serve it"), soft_wrap=True,
            )  # fmt: skip
        return

    report = _guard(
        lambda: run_provision(
            load_consortium(consortium_toml), out, add_sites=tuple(add_site or ())
        )
    )
    document = _guard(report.to_json)
    if as_json:
        sys.stdout.write(json.dumps(document) + "\n")
        return
    if report.issued_ca:
        lines = [
            f"CA: {document['ca_cert']} (valid until {document['ca_not_valid_after']});"
            f" its key stays in {report.layout.ca_key}",
            f"SuperLink: {document['superlink_cert']} (valid until"
            f" {document['superlink_not_valid_after']})",
        ]
        for line in lines:
            stdout.print(Text(line), soft_wrap=True)
    for site in report.sites_added:
        stdout.print(
            Text(f"site kit: {report.layout.site_dir(site)} (see its README.txt)"), soft_wrap=True
        )


coordinator_app = typer.Typer(
    help="The consortium lead's commands: run and check the consortium's SuperLink.",
    no_args_is_help=True,
)
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(bench_app, name="bench")


@coordinator_app.command("start")
def coordinator_start(consortium_toml: ConsortiumToml, pki: PkiDir) -> None:
    """Start the consortium's TLS SuperLink with SuperNode authentication, register every
    provisioned site's key, and supervise it until Ctrl-C or SIGTERM."""
    from medfed.coordinator.consortium import load_consortium
    from medfed.coordinator_cli import start_coordinator
    from medfed.provision import PkiLayout

    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if not stopping:  # a second signal must not cut the shutdown short
            stopping = True
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    config = _guard(lambda: load_consortium(consortium_toml))
    try:
        _guard(
            lambda: start_coordinator(
                config,
                PkiLayout(pki),
                say=lambda line: stdout.print(Text(line), soft_wrap=True),
                warn=lambda line: stderr.print(Text(line), soft_wrap=True),
            )
        )
    except KeyboardInterrupt:
        stdout.print(Text("stopped the SuperLink and everything it started"), soft_wrap=True)


@coordinator_app.command("status")
def coordinator_status(
    consortium_toml: ConsortiumToml,
    pki: PkiDir,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout.")
    ] = False,
) -> None:
    """Expiry of the CA's and SuperLink's certificates (warning within 30 days), and whether
    the SuperLink answers over TLS; exit 1 if a certificate expired or it does not answer."""
    from medfed.coordinator.consortium import load_consortium
    from medfed.coordinator_cli import coordinator_status as read_status
    from medfed.provision import PkiLayout

    status = _guard(lambda: read_status(load_consortium(consortium_toml), PkiLayout(pki)))
    if as_json:
        sys.stdout.write(json.dumps(status.to_json()) + "\n")
    else:
        table = Table(title=f"consortium SuperLink at {status.address}")
        for column in ("certificate", "valid until", "days left", "file"):
            table.add_column(column)
        for expiry in status.certificates:
            table.add_row(
                expiry.name, expiry.not_valid_after.strftime("%Y-%m-%d %H:%M UTC"),
                str(expiry.days_left), Text(str(expiry.path)),
            )  # fmt: skip
        stdout.print(table)
        answer = "answers over TLS" if status.healthy else "does NOT answer over TLS"
        stdout.print(Text(f"SuperLink {status.address} {answer}"), soft_wrap=True)
        for run in status.runs:
            done = f"{run['rounds_completed']} of {run['num_rounds'] or '?'} rounds"
            stdout.print(Text(f"run {run['run']}: {run['status']}, {done}"), soft_wrap=True)
    for expiry in status.certificates:
        if expiry.warning is not None:
            stderr.print(Text(f"warning: {expiry.warning}"), soft_wrap=True)
    if not status.ok:
        raise typer.Exit(1)


@coordinator_app.command("revoke")
def coordinator_revoke(
    consortium_toml: ConsortiumToml,
    pki: PkiDir,
    site: Annotated[str, typer.Argument(help="The site id to revoke.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout.")
    ] = False,
) -> None:
    """Revoke a site: record it in the PKI folder's revoked.json (no later start registers
    its key) and unregister its SuperNode from the running SuperLink."""
    from medfed.coordinator.consortium import load_consortium
    from medfed.coordinator_cli import revoke_site
    from medfed.provision import PkiLayout

    revoked = _guard(lambda: revoke_site(load_consortium(consortium_toml), PkiLayout(pki), site))
    if as_json:
        sys.stdout.write(json.dumps(revoked.to_json()) + "\n")
    else:
        stdout.print(Text(f"{site} revoked at {revoked.revoked_at}: {revoked.note}"),
                     soft_wrap=True)  # fmt: skip


add_check_command(site_app)
app.add_typer(site_app, name="site")


@app.command()
def report(
    run_dir: Annotated[
        Path, typer.Argument(help="The run folder (results.json, checkpoints, audit chain).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Where to write the HTML report.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout.")
    ] = False,
) -> None:
    """Write a run's report: metrics per round and site, participation, epsilon per site,
    and a model card with the lineage; exit 1 if the audit chain does not verify."""
    from medfed.run_report import write_report

    folder = _guard(lambda: write_report(run_dir, out))
    if as_json:
        document = {
            "out": str(out),
            "run_id": folder.results.run_id,
            "rounds_completed": folder.results.rounds_completed,
            "audit_verified": folder.audit_ok,
            "audit": folder.audit,
        }
        sys.stdout.write(json.dumps(document) + "\n")
    else:
        stdout.print(Text(f"wrote {out}"), soft_wrap=True)
    if folder.audit_ok is False:
        stderr.print(Text(f"audit chain: {folder.audit}"), soft_wrap=True)
        raise typer.Exit(1)


@app.command()
def version() -> None:
    """Print medfed's version."""
    from medfed import __version__

    stdout.print(__version__)


app.add_typer(round_app, name="round")
app.command("ask")(ask)
app.add_typer(model_app, name="model")


def main() -> None:
    """Entry point of the `medfed` console script."""
    app()
