"""The site's own policy, ``SITE_DIR/site-policy.toml``: rules the ClientApp enforces on every message.

Written and changed only by the hospital; whatever the run config says, a request that breaks a rule
is refused with an error reply naming the rule (``policy-refused rule=dp-required``). Every key is
optional; an absent key sets no rule::

    allowed-tasks = ["grading", "typing"]     # tasks this site trains or evaluates
    dp-required = true                        # train only with local DP-SGD (run config dp = "opacus")
    min-noise-multiplier = 0.8                # ... with at least this noise
    max-epsilon-per-run = 3.0                 # epsilon one run may spend at this site
    max-epsilon-lifetime = 10.0               # all runs together (tightens node config max-epsilon)
    secagg-required = true                    # updates leave only masked (SecAgg+)
    min-report-cases = 20                     # no metric from fewer cases (tightens the node config)
    max-local-epochs = 5                      # local epochs one train message may ask for
    allowed-server-fingerprints = ["sha256:..."]  # SHA-256 of the server certificate the SuperNode
                                                  # trusts (node config server-certificate)
"""

from __future__ import annotations

import dataclasses
import hashlib
import tomllib
from contextvars import ContextVar
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from shared.config import NodeConfig, RunConfig

POLICY_FILE = "site-policy.toml"


class PolicyError(ValueError):
    """``site-policy.toml`` cannot be used (not TOML, unknown key, wrong type, unknown task)."""


class PolicyRefused(RuntimeError):
    """A request breaks a rule of the site's policy; ``rule`` is the key of that rule."""

    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(f"site policy {rule}: {detail}")
        self.rule = rule


@dataclass(frozen=True)
class SitePolicy:
    """The rules of ``site-policy.toml`` (field ``foo_bar`` is key ``foo-bar``; 0 / empty = no rule)."""

    allowed_tasks: tuple[str, ...] = ()
    dp_required: bool = False
    min_noise_multiplier: float = 0.0
    max_epsilon_per_run: float = 0.0
    max_epsilon_lifetime: float = 0.0
    secagg_required: bool = False
    min_report_cases: int = 0
    max_local_epochs: int = 0
    allowed_server_fingerprints: tuple[str, ...] = ()

    def as_toml_dict(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}


RULES = tuple(f.name.replace("_", "-") for f in fields(SitePolicy))
# (policy, Flower run id) of the request being served: the privacy ledger reads it for the per-run
# budget and the noise floor of a target-epsilon run
REQUEST: ContextVar[tuple[SitePolicy, str] | None] = ContextVar("site_policy_request", default=None)


def _typed(key: str, value: Any, kind: str) -> Any:
    ok = {"bool": isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0,
          "int": isinstance(value, int) and not isinstance(value, bool) and value >= 0,
          "tuple[str, ...]": isinstance(value, list) and all(isinstance(v, str) for v in value)}[kind]
    if not ok:
        raise PolicyError(f"{POLICY_FILE}: {key} = {value!r} is not a valid "
                          f"{'non-negative number' if kind in ('int', 'float') else kind}")
    return tuple(value) if kind == "tuple[str, ...]" else value


def parse_policy(text: str) -> SitePolicy:
    """A :class:`SitePolicy` from TOML text; :class:`PolicyError` naming the key otherwise."""
    from shared.tasks import TASKS

    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise PolicyError(f"{POLICY_FILE}: not valid TOML ({err})") from None
    kinds = {f.name.replace("_", "-"): f.type for f in fields(SitePolicy)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in kinds:
            raise PolicyError(f"{POLICY_FILE}: unknown key {key!r} (known: {', '.join(RULES)})")
        values[key.replace("-", "_")] = _typed(key, value, kinds[key])
    unknown = sorted(set(values.get("allowed_tasks", ())) - set(TASKS))
    if unknown:
        raise PolicyError(f"{POLICY_FILE}: allowed-tasks names unknown task(s) {', '.join(unknown)}")
    return SitePolicy(**values)


_CACHE: dict[str, tuple[int, SitePolicy]] = {}


def load_policy(site_dir: str | Path) -> SitePolicy:
    """The policy of a site folder (no file = no rules); re-read whenever the file changes."""
    path = Path(site_dir) / POLICY_FILE
    if not path.is_file():
        return SitePolicy()
    stamp = path.stat().st_mtime_ns
    cached = _CACHE.get(str(path))
    if cached is None or cached[0] != stamp:
        cached = (stamp, parse_policy(path.read_text(encoding="utf-8")))
        _CACHE[str(path)] = cached
    return cached[1]


def _tightest(a: float, b: float) -> float:
    """The stricter of two budgets where 0 means none."""
    positive = [x for x in (a, b) if x > 0]
    return min(positive) if positive else 0.0


def effective_node(policy: SitePolicy, node: NodeConfig) -> NodeConfig:
    """The node config with the policy's limits applied (a policy only ever tightens)."""
    return dataclasses.replace(
        node, max_epsilon=_tightest(node.max_epsilon, policy.max_epsilon_lifetime),
        min_report_cases=max(node.min_report_cases, policy.min_report_cases))


def certificate_fingerprint(path: str | Path) -> str:
    """``sha256:<hex>`` of a PEM certificate's DER bytes (of the file's bytes if it is not PEM)."""
    import ssl

    data = Path(path).read_bytes()
    try:
        der = ssl.PEM_cert_to_DER_cert(data.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        der = data
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _norm(fp: str) -> str:
    return fp.lower().removeprefix("sha256:").replace(":", "")


def check_request(policy: SitePolicy, kind: str, run: RunConfig, node: NodeConfig,
                  config: Any = None, secagg_message: bool = False) -> None:
    """Raise :class:`PolicyRefused` when a ``kind`` (query | train | evaluate) request breaks a rule."""
    if policy.allowed_tasks and run.task not in policy.allowed_tasks:
        raise PolicyRefused("allowed-tasks", f"task {run.task} is not one of "
                            f"{', '.join(policy.allowed_tasks)}")
    if policy.allowed_server_fingerprints:
        cert = getattr(node, "server_certificate", "")
        if not cert or not Path(cert).is_file():
            raise PolicyRefused("allowed-server-fingerprints", "node config names no "
                                "server-certificate to check")
        if _norm(certificate_fingerprint(cert)) not in {_norm(f) for f in
                                                        policy.allowed_server_fingerprints}:
            raise PolicyRefused("allowed-server-fingerprints",
                                f"{certificate_fingerprint(cert)} is not an allowed server")
    if kind != "train":
        return
    if policy.dp_required and run.dp != "opacus":
        raise PolicyRefused("dp-required", f'run config dp = "{run.dp}", the site trains only with '
                            'dp = "opacus"')
    if (policy.min_noise_multiplier and run.dp == "opacus" and run.target_epsilon <= 0
            and run.noise_multiplier < policy.min_noise_multiplier):
        raise PolicyRefused("min-noise-multiplier", f"noise-multiplier {run.noise_multiplier:g} < "
                            f"{policy.min_noise_multiplier:g}")
    if policy.secagg_required and not (run.secagg and secagg_message):
        raise PolicyRefused("secagg-required", "the site sends updates only masked (SecAgg+)")
    epochs = int(config.get("local-epochs", run.local_epochs)) if config is not None else \
        run.local_epochs
    if policy.max_local_epochs and epochs > policy.max_local_epochs:
        raise PolicyRefused("max-local-epochs", f"{epochs} local epochs asked, at most "
                            f"{policy.max_local_epochs}")


def tightened(node: NodeConfig) -> NodeConfig:
    """``node`` with its site policy's limits (:func:`effective_node`); a bad policy file raises
    :class:`PolicyError`."""
    return effective_node(load_policy(node.data_path), node) if node.data_path else node
