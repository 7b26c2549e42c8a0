"""`gliofed import <layout>` (public dataset layouts -> cohort.csv) and `gliofed site check`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

site_app = typer.Typer(help="Site data: validate a site folder before it joins a federation.",
                       no_args_is_help=True)
import_app = typer.Typer(help="Write a cohort.csv for a public dataset layout (images are not copied).",
                         no_args_is_help=True)


@site_app.command("check")
def site_check(
    site_dir: Annotated[Path, typer.Argument(help="Site folder with cohort.csv.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON report instead.")] = False,
    workers: Annotated[int, typer.Option(help="Processes for image checks (0: all cores).")] = 0,
    allow_outside: Annotated[list[Path], typer.Option(
        "--allow-outside", help="A folder outside the site that cohort.csv may reference "
        "(repeatable; importers record theirs in allowed-roots.txt).")] = [],  # noqa: B006
    max_image_mb: Annotated[float, typer.Option(
        "--max-image-mb", help="Largest image to open, MiB as float32 (0: node config's default).")
    ] = 0.0,
) -> None:
    """Validate without modifying anything; report every problem; exit 1 on errors (an empty site is one)."""
    from client.site_check import check_site

    bar = None if as_json else ProgressBar("checking images")
    try:
        report = check_site(site_dir, workers=workers or None, progress=bar,
                            allow_outside=allow_outside, max_image_mb=max_image_mb or None)
    finally:
        if bar is not None:
            bar.close()
    if as_json:
        typer.echo(json.dumps({
            "site": str(report.site), "sessions": report.n_cases, "ok": report.ok,
            "problems": [{"severity": p.severity, "file": p.file, "line": p.line,
                          "message": p.message} for p in report.problems],
            "tasks": {t.task: {"usable": t.usable, "bad_files": t.excluded, "not_eligible": t.skipped}
                      for t in report.tasks}}, indent=2))
    else:
        print_report(report)
    if not report.ok:
        raise typer.Exit(1)


class ProgressBar:
    """A transient rich progress bar on stderr, started at the first ``(done, total)`` call."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._bar = None
        self._task = None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            from rich.console import Console
            from rich.progress import Progress

            self._bar = Progress(console=Console(stderr=True), transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=total)
        self._bar.update(self._task, completed=done)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def print_report(report) -> None:
    """A site check's problems one per line, then the per-task table (``client.site_check.SiteReport``)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=True)  # one problem = one line, never wrapped
    for p in report.problems:
        console.print(str(p), style="red" if p.severity == "error" else "yellow", markup=False)
    if not report.tasks:
        console.print(f"{len(report.errors)} error(s)", style="red")
        return
    table = Table(title=f"{report.site}: {report.n_cases} sessions")
    table.add_column("task")
    table.add_column("usable", justify="right")
    for split in ("train", "val", "test"):
        table.add_column(split)
    table.add_column("bad files", justify="right")
    table.add_column("not eligible", justify="right")
    for t in report.tasks:
        cells = [", ".join(f"{k} {v}" for k, v in t.usable[s].items() if v) or "-"
                 for s in ("train", "val", "test")]
        table.add_row(t.task, str(t.total), *cells, str(t.excluded), str(t.skipped))
    console.print(table)
    n_err, n_warn = len(report.errors), len(report.problems) - len(report.errors)
    console.print(f"{n_err} error(s), {n_warn} warning(s)", style="red" if n_err else "green")


@site_app.command("policy")
def site_policy(
    site_dir: Annotated[Path, typer.Argument(help="Site folder (with site-policy.toml, if any).")],
    node_config: Annotated[str, typer.Option(
        help="The SuperNode's node config (KEY=VALUE ...), to show the limits in force.")] = "",
) -> None:
    """Print the effective site policy: the file's rules and the node config limits they tighten."""
    import shlex

    from client.policy import POLICY_FILE, PolicyError, effective_node, load_policy
    from shared.config import NodeConfig, RunConfig

    try:
        policy = load_policy(site_dir)
    except PolicyError as exc:
        typer.secho(f"error: {site_dir}/{exc}", fg="red", err=True)
        raise typer.Exit(1) from None
    raw = dict(item.partition("=")[::2] for item in shlex.split(node_config))
    node = effective_node(policy, NodeConfig.from_flower({"data-path": str(site_dir), **raw},
                                                         RunConfig()))
    source = site_dir / POLICY_FILE
    typer.echo(f"# {source if source.is_file() else 'no ' + POLICY_FILE + ': no rules'}")
    for key, value in policy.as_toml_dict().items():
        shown = json.dumps(list(value)) if isinstance(value, tuple) else json.dumps(value)
        typer.echo(f"{key} = {shown}{'' if value else '  # no rule'}")
    typer.echo(f"# in force with the node config: max-epsilon = {node.max_epsilon:g} (0 = none), "
               f"min-report-cases = {node.min_report_cases}")


@site_app.command("audit")
def site_audit(
    site_dir: Annotated[Path, typer.Argument(help="Site folder (its name is the default site-id).")],
    site_id: Annotated[str, typer.Option(help="The site-id of the SuperNode (default: folder name).")
                       ] = "",
    log: Annotated[Path | None, typer.Option(help="An audit log file to read instead.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Summarise the site's audit log: requests served / refused / failed, rules, runs, bytes, epsilon."""
    from client.audit import audit_path, read_log, summarise
    from shared.config import NodeConfig, RunConfig

    node = NodeConfig.from_flower({"data-path": str(site_dir), **({"site-id": site_id} if site_id
                                                                   else {})}, RunConfig())
    path = log or audit_path(node)
    entries = read_log(path)
    if not entries:
        typer.secho(f"error: no audit log at {path}", fg="red", err=True)
        raise typer.Exit(1)
    summary = summarise(entries)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(f"{path}: {summary['requests']} request(s) {summary['first']} .. {summary['last']}, "
               f"{len(summary['runs'])} run(s)")
    for key, n in sorted(summary["by_kind_outcome"].items()):
        typer.echo(f"  {key}: {n}")
    for rule, n in sorted(summary["refused_by_rule"].items()):
        typer.echo(f"  refused by {rule}: {n}")
    typer.echo(f"  bytes sent: {summary['bytes_sent']}, epsilon spent: {summary['epsilon_spent']:.3f}")


def _import(layout: str, src: Path, out: Path, **kw) -> None:
    from shared.importers import ImportErrorForUser, run_importer

    try:
        result = run_importer(layout, src, out, progress=True, **kw)
    except ImportErrorForUser as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    for cid, reason in result.skipped:
        typer.echo(f"skipped {cid}: {reason}")
    for cid, note in result.notes:
        typer.echo(f"note {cid}: {note}")
    typer.echo(f"{layout}: {result.n_cases} session(s) written to {result.cohort_csv}; "
               f"{len(result.skipped)} skipped")
    for col, counts in result.label_counts.items():
        typer.echo(f"  {col}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


SrcArg = Annotated[Path, typer.Argument(help="The dataset folder as downloaded.")]
OutOpt = Annotated[Path, typer.Option("--out", help="Site folder to write cohort.csv into.")]


@import_app.command("brats2020")
def import_brats2020(src: SrcArg, out: OutOpt) -> None:
    """BraTS 2020 (grade from name_mapping.csv; .nii or .nii.gz; case 355's misnamed seg)."""
    _import("brats2020", src, out)


@import_app.command("brats2021")
def import_brats2021(src: SrcArg, out: OutOpt) -> None:
    """BraTS 2021 (BraTS2021_#####; no grade)."""
    _import("brats2021", src, out)


@import_app.command("brats2023")
def import_brats2023(src: SrcArg, out: OutOpt) -> None:
    """BraTS 2023 GLI (t1c/t1n/t2f/t2w; seg label 3 converted to 4 into OUT/converted/)."""
    _import("brats2023", src, out)


@import_app.command("fets")
def import_fets(
    src: SrcArg, out: OutOpt,
    partitions: Annotated[Path | None, typer.Option(help="Subject_ID,Partition_ID CSV -> site")] = None,
) -> None:
    """FeTS (BraTS naming) with a partitioning CSV mapped to the `site` column."""
    _import("fets", src, out, partitions=partitions)


@import_app.command("lumiere")
def import_lumiere(src: SrcArg, out: OutOpt) -> None:
    """LUMIERE (Patient-NNN/week-NNN[-k]; RANO pairs from the expert-rating CSV)."""
    _import("lumiere", src, out)


@import_app.command("ucsf-pdgm")
def import_ucsf_pdgm(src: SrcArg, out: OutOpt) -> None:
    """UCSF-PDGM (WHO grade 2-3 -> LGG, 4 -> HGG; zero-padded IDs)."""
    _import("ucsf-pdgm", src, out)


def register(app: typer.Typer) -> None:
    """Add `site check` and `import <layout>`."""
    app.add_typer(site_app, name="site")
    app.add_typer(import_app, name="import")
