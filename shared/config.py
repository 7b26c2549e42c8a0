"""Typed run and node configuration, parsed once from Flower's flat kebab-case dictionaries.

Flower hands the ServerApp/ClientApp a flat ``run_config`` (``[tool.flwr.app.config]`` plus ``-c``
overrides; empty under ``run_simulation``) and a per-SuperNode ``node_config``. Only this module reads
those raw keys: everything else receives a frozen :class:`RunConfig` / :class:`NodeConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

DP_MODES = ("none", "opacus", "central")
EXPORTS = ("best", "final")
BALANCES = ("weighted_loss", "sampler", "none", "logit_adjust")  # TrainConfig.balance
LR_SCHEDULES = ("constant", "cosine")  # RunConfig.lr_schedule (over rounds), TrainConfig's (over epochs)


def cosine_lr(lr: float, step: int, total: int) -> float:
    """The cosine schedule's rate at 1-based ``step`` of ``total`` (server rounds or epochs):
    ``lr x (1 + cos(pi (step - 1) / total)) / 2``, ``lr`` at step 1."""
    return lr * (1 + math.cos(math.pi * (step - 1) / total)) / 2


@dataclass(frozen=True)
class RunConfig:
    """One federated run (same for every site). Field ``foo_bar`` is run-config key ``foo-bar``."""

    task: str = "grading"
    num_server_rounds: int = 3
    local_epochs: int = 1
    strategy: str = "fedavg"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_nodes: int = 1
    min_evaluate_nodes: int = 1
    min_available_nodes: int = 2  # the quorum
    quorum_timeout: float = 60.0  # seconds to wait for the quorum before going on / stopping
    quorum_action: str = "proceed"  # proceed | stop when the quorum is not reached in time
    round_timeout: float = 3600.0  # seconds a round waits for replies (stragglers are dropped)
    proximal_mu: float = 0.01  # FedProx only
    server_lr: float = 0.0  # server learning rate (FedAdam/FedYogi eta, FedAvgM, SCAFFOLD's eta_g);
    #                         0 = the strategy's swept default (SERVER_LR_DEFAULTS)
    server_momentum: float = 0.9  # FedAvgM (swept: benchmarks/server_opt_sweep.py)
    trimmed_beta: float = 0.2  # FedTrimmedAvg
    num_malicious: int = 0  # Krum / MultiKrum / Bulyan
    lr: float = 1e-3
    lr_schedule: str = ""  # local lr over the server rounds: "" = the task's (TaskSpec.fed_lr_schedule:
    #                        cosine, constant for typing) | cosine (round r trains at
    #                        lr * (1 + cos(pi (r - 1) / num-server-rounds)) / 2) | constant
    batch_size: int = 8
    balance: str = ""  # site loss under class imbalance: "" = the learning core's (weighted_loss) |
    #                    weighted_loss | sampler | none | logit_adjust (for label-skewed sites)
    input_size: int = 0  # cubic crop/pad side; 0 = the task's default
    network: str = ""  # "" = the task's default network
    init_model: str = ""  # MODEL_DIR whose weights start the federation ("" = fresh, seeded)
    seed: int = 0
    device: str = "auto"
    run_dir: str = "runs/flwr"
    resume: bool = False
    keep_checkpoints: int = 2  # round checkpoints kept (the last N, plus a marked best); 0 = all
    server_cohort: str = ""  # site folder with a test split the server evaluates on ("" = none)
    sites_root: str = ""  # simulation: folder holding site-<partition-id>/cohort.csv
    cache_dir: str = ""
    dp: str = "none"  # none | opacus | central
    noise_multiplier: float = 1.0
    target_epsilon: float = 0.0  # 0 = use noise-multiplier as given
    target_delta: float = 1e-5
    max_grad_norm: float = 1.0
    dp_train_layers: str = ""  # dp = opacus: "" = all, "last:N" blocks or "PREFIX,PREFIX" (rest frozen)
    dp_logical_batch: int = 0  # dp = opacus: patients per DP step (0 = batch-size); > batch-size = virtual
    secagg: bool = False  # SecAgg+: the server learns only the sum of the sites' updates
    secagg_num_shares: int = 0  # key shares per site: 0 = every sampled site, else odd >= 3
    secagg_reconstruction_threshold: int = 0  # shares needed to unmask: 0 = a majority of them
    validate_updates: bool = False
    export: str = "best"  # best (highest pooled validation score of the new global model) | final
    select_tolerance: float = 0.01  # export = best: a later round within this share of the peak pooled
    #                                 validation score is chosen over it (0 = the peak round itself)
    global_ema: float = 0.0  # > 0: what is scored, selected and exported after each round is an
    #                           exponential moving average of the global models (decay per round;
    #                           shared/round_average.py); the sites train on from the plain aggregate
    early_stop_patience: int = 0  # stop after this many rounds without a better validation score; 0 = off
    fedbn: bool = False  # FedBN: normalisation layers stay at each site, never sent or averaged
    personalise: str = "none"  # none | finetune (after the last round) | ditto (a personal model
    #                            trained beside the global one); scored on each site's test split
    finetune_epochs: int = 2  # personalise = "finetune": epochs of local fine-tuning
    ditto_lambda: float = 0.1  # personalise = "ditto": proximal weight lambda/2 * ||v - w_global||^2
    tracking_uri: str = ""  # MLflow tracking URI ("" = off), e.g. sqlite:///runs/mlflow.db

    def __post_init__(self) -> None:
        _check_options(self)

    @classmethod
    def from_flower(cls, raw: Mapping[str, Any] | None) -> RunConfig:
        """Parse Flower's run config; missing keys keep their defaults, unknown keys are an error.

        Option combinations are checked when the object is built (``__post_init__``), once per parse.
        """
        return cls(**_coerce(cls, raw or {}, "run config"))

    def to_flower(self) -> dict[str, Any]:
        """The flat kebab-case dict Flower expects (inverse of :meth:`from_flower`)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def overridden(self, raw: Mapping[str, Any] | None) -> RunConfig:
        """This config with Flower's flat values on top (``flwr run -c``); itself when there are none."""
        return RunConfig.from_flower({**self.to_flower(), **raw}) if raw else self

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def round_lr(self, server_round: int) -> float:
        """The local learning rate of ``server_round`` (1-based; 0 = outside a round: ``lr``)."""
        if self.resolved_lr_schedule() == "cosine" and server_round >= 1:
            return cosine_lr(self.lr, server_round, self.num_server_rounds)
        return self.lr

    def resolved_lr_schedule(self) -> str:
        """``lr-schedule``, or the task's own when it is "" (the default)."""
        if self.lr_schedule:
            return self.lr_schedule
        from shared.tasks import get_task

        return get_task(self.task).fed_lr_schedule

    def effective_server_lr(self) -> float:
        """``server-lr``, or the strategy's swept default when it is 0 (1.0 for plain averaging)."""
        return self.server_lr if self.server_lr > 0 else SERVER_LR_DEFAULTS.get(
            self.strategy.lower(), 1.0)


STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm", "fedmedian", "fedtrimmedavg",
              "krum", "multikrum", "bulyan", "scaffold")
PERSONALISE = ("none", "finetune", "ditto")
# server learning rates used when server-lr = 0, chosen by benchmarks/server_opt_sweep.py (pooled
# validation AUC of the exported round, 5 sites, dirichlet 0.5, grading, resnet10, 5 rounds, 2 seeds;
# benchmarks/README.md "Server optimisers"). FedAvgM's momentum is RunConfig.server_momentum.
SERVER_LR_DEFAULTS = {"fedadam": 0.01, "fedyogi": 0.003, "fedavgm": 0.5, "scaffold": 1.0}
SECAGG_STRATEGIES = ("fedavg", "fedprox")  # the aggregations that are a weighted mean
CENTRAL_DP_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm")  # averages only


def _check_options(cfg: RunConfig) -> None:
    """Every option that must be one of a list, and every combination that cannot run: a ValueError
    naming the option (called once, when a RunConfig is built)."""
    if cfg.strategy.lower() not in STRATEGIES:
        raise ValueError(f"run config: strategy={cfg.strategy!r} is not one of {', '.join(STRATEGIES)}")
    if cfg.dp not in DP_MODES:
        raise ValueError(f"run config: dp={cfg.dp!r} is not one of {', '.join(DP_MODES)}")
    _check_scaffold(cfg)
    if cfg.personalise not in PERSONALISE:
        raise ValueError(f"run config: personalise={cfg.personalise!r} is not one of "
                         f"{', '.join(PERSONALISE)}")
    if cfg.personalise == "ditto" and cfg.secagg:
        raise ValueError('run config: personalise = "ditto" cannot be combined with secagg = true (the '
                         "SecAgg+ training path keeps no per-site state for the personal model); "
                         'use personalise = "finetune"')
    if cfg.finetune_epochs < 1 or cfg.ditto_lambda < 0:
        raise ValueError(f"run config: finetune-epochs={cfg.finetune_epochs} must be >= 1 and "
                         f"ditto-lambda={cfg.ditto_lambda} >= 0")
    if cfg.quorum_action not in ("proceed", "stop"):
        raise ValueError(f"run config: quorum-action={cfg.quorum_action!r} is not proceed|stop")
    if cfg.dp == "central" and cfg.strategy.lower() not in CENTRAL_DP_STRATEGIES:
        raise ValueError(
            f"run config: dp='central' cannot be combined with strategy={cfg.strategy!r} (median, "
            f"trimmed-mean and Krum-type rules are not averages, so the DP noise calibration does "
            f"not hold); use one of {', '.join(CENTRAL_DP_STRATEGIES)}")
    if cfg.lr_schedule and cfg.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"run config: lr-schedule={cfg.lr_schedule!r} is not {'|'.join(LR_SCHEDULES)}")
    if cfg.balance and cfg.balance not in BALANCES:
        raise ValueError(f"run config: balance={cfg.balance!r} is not one of {', '.join(BALANCES)}")
    if cfg.export not in EXPORTS:
        raise ValueError(f"run config: export={cfg.export!r} is not one of {', '.join(EXPORTS)}")
    if not 0 <= cfg.select_tolerance < 1:
        raise ValueError(f"run config: select-tolerance={cfg.select_tolerance} must be in [0, 1) (a share "
                         "of the peak validation score; 0 = export the peak round)")
    if not 0 <= cfg.global_ema < 1:
        raise ValueError(f"run config: global-ema={cfg.global_ema} must be in [0, 1) (the decay per round "
                         "of the scored moving average; 0 = off)")
    if cfg.early_stop_patience < 0:
        raise ValueError(f"run config: early-stop-patience={cfg.early_stop_patience} must be >= 0 "
                         "(rounds without a better validation score; 0 = off)")
    _check_secagg(cfg)
    _check_fedbn(cfg)
    _check_dp_training(cfg)


def _check_dp_training(cfg: RunConfig) -> None:
    """The DP-SGD training options (what is trained, the logical batch) need ``dp = "opacus"``."""
    if cfg.dp_logical_batch < 0:
        raise ValueError(f"run config: dp-logical-batch={cfg.dp_logical_batch} must be >= 0 "
                         "(0 = batch-size)")
    if cfg.dp != "opacus" and (cfg.dp_train_layers.strip() or cfg.dp_logical_batch):
        key = "dp-train-layers" if cfg.dp_train_layers.strip() else "dp-logical-batch"
        raise ValueError(f'run config: {key} applies to DP-SGD at the sites; set dp = "opacus" '
                         f"(dp={cfg.dp!r})")
    if cfg.dp_logical_batch and cfg.dp_logical_batch < cfg.batch_size:
        raise ValueError(f"run config: dp-logical-batch={cfg.dp_logical_batch} is smaller than "
                         f"batch-size={cfg.batch_size} (the physical batch); use 0 or >= batch-size")


def _check_scaffold(cfg: RunConfig) -> None:
    """SCAFFOLD's control variates travel beside the weights; the paths that see only the weights
    (or only their sum) cannot carry them."""
    if cfg.strategy.lower() != "scaffold":
        return
    if cfg.secagg:
        raise ValueError("run config: strategy = scaffold cannot be combined with secagg = true (the "
                         "SecAgg+ path masks one weight vector per site; SCAFFOLD sites also send "
                         "their control-variate update, which would travel unmasked)")
    if cfg.dp == "central":
        raise ValueError('run config: strategy = scaffold cannot be combined with dp = "central" (the '
                         "server's noise covers the weights only; the sites' control-variate updates "
                         'would leave unclipped and noise-free); use dp = "opacus"')


def _check_fedbn(cfg: RunConfig) -> None:
    """FedBN sends part of the model; the paths that need the whole update cannot take it (yet)."""
    if not cfg.fedbn:
        return
    if cfg.secagg:
        raise ValueError("run config: fedbn = true cannot be combined with secagg = true (the SecAgg+ "
                         "path masks the whole weight vector; FedBN sites send only the shared part)")
    if cfg.dp == "central":
        raise ValueError('run config: fedbn = true cannot be combined with dp = "central" (Flower\'s '
                         "client-side clipping compares the whole received and sent weights); "
                         'use dp = "opacus"')


def _check_secagg(cfg: RunConfig) -> None:
    """SecAgg+ settings and the options it cannot run with."""
    shares, threshold = cfg.secagg_num_shares, cfg.secagg_reconstruction_threshold
    if shares != 0 and (shares < 3 or shares % 2 == 0):
        raise ValueError(f"run config: secagg-num-shares={shares} must be 0 (every sampled site) "
                         "or an odd number >= 3")
    if threshold != 0 and threshold < 2:
        raise ValueError(f"run config: secagg-reconstruction-threshold={threshold} must be 0 "
                         "(a majority of the shares) or >= 2")
    if shares and threshold > shares:
        raise ValueError(f"run config: secagg-reconstruction-threshold={threshold} is larger than "
                         f"secagg-num-shares={shares}")
    if not cfg.secagg:
        return
    if cfg.strategy.lower() not in SECAGG_STRATEGIES:
        raise ValueError(
            f"run config: secagg = true works with strategy fedavg or fedprox, not "
            f"strategy={cfg.strategy!r}: the server sees only the sum of the updates, which robust "
            "aggregation (median, trimmed mean, Krum, Bulyan) cannot use, and the server optimisers "
            "(fedadam, fedyogi, fedavgm) are not wired to the SecAgg+ path")
    if cfg.dp == "central":
        raise ValueError(
            'run config: secagg = true cannot be combined with dp = "central" (Flower\'s central-DP '
            "wrappers need the Message-API strategies, SecAgg+ runs only on the legacy one); "
            'use dp = "opacus": local DP-SGD at each site, before masking')
    if cfg.validate_updates:
        raise ValueError(
            "run config: secagg = true cannot be combined with validate-updates = true: the server "
            "sees only the sum of the updates, so it cannot validate one site's update")


@dataclass(frozen=True)
class NodeConfig:
    """One site (SuperNode): where its data lives and its local limits."""

    data_path: str = ""
    site_id: str = ""
    max_epsilon: float = 0.0  # 0 = the site sets no privacy ceiling
    device: str = "auto"
    partition_id: int = -1  # simulation only
    num_partitions: int = 0  # simulation only
    min_report_cases: int = 10  # fewest test cases behind any metric or histogram bin the site sends
    max_image_mb: float = 1024.0  # largest image (MiB once read as float32) the site will open
    allow_outside: str = ""  # folders outside data-path that cohort.csv may reference (os.pathsep list)
    server_certificate: str = ""  # the server certificate the SuperNode trusts (site policy pinning)

    @classmethod
    def from_flower(cls, raw: Mapping[str, Any] | None, run: RunConfig) -> NodeConfig:
        """Parse a node config; in simulation map ``partition-id`` to ``SITES_ROOT/site-<id>``."""
        cfg = cls(**_coerce(cls, raw or {}, "node config", ignore_unknown=True))
        if not cfg.data_path and cfg.partition_id >= 0:
            if not run.sites_root:
                raise ValueError(
                    "node config: simulated node has partition-id but run config sets no sites-root"
                )
            site_dir = Path(run.sites_root) / f"site-{cfg.partition_id}"
            cfg = dataclasses.replace(cfg, data_path=str(site_dir))
        if not cfg.site_id and cfg.data_path:
            cfg = dataclasses.replace(cfg, site_id=Path(cfg.data_path).name)
        return cfg


def _coerce(
    cls: type, raw: Mapping[str, Any], what: str, ignore_unknown: bool = False
) -> dict[str, Any]:
    """Map kebab-case keys to field names and cast values to the field types."""
    kinds = {f.name: f.type for f in fields(cls)}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in kinds:
            if ignore_unknown:
                continue
            raise ValueError(f"{what}: unknown key {key!r}")
        kind = kinds[name]
        try:
            if kind == "bool":
                out[name] = value if isinstance(value, bool) else str(value).lower() in (
                    "1", "true", "yes")
            elif kind == "int":
                out[name] = int(value)
            elif kind == "float":
                out[name] = float(value)
            else:
                out[name] = str(value)
        except (TypeError, ValueError):
            raise ValueError(f"{what}: {key}={value!r} is not a valid {kind}") from None
    return out
