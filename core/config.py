"""The run configuration: Flower's flat ``run_config`` turned once into a validated dataclass.

Every key of ``[tool.flwr.app.config]`` (and of ``--run-config`` overrides) maps to one field
here, kebab-case to snake_case. Unknown keys, wrong types and impossible values fail before any
training, with a message that names the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from core.adapters.settings import LORA_TARGETS, LoraSettings
from core.model.sizes import MODEL_SIZES, POOLS
from core.privacy.plan import ACCOUNTANTS, DPSettings
from core.training.settings import TrainSettings


class ConfigError(ValueError):
    """A run-config key is unknown, of the wrong type, or has an impossible value."""


# Below this a round cannot finish: one round of the smallest model on phantom data takes
# 10-25 s here (README), and a timed-out round is lost. Flower's own default is 3600 s.
MIN_ROUND_TIMEOUT = 30.0
TASKS = ("classification", "segmentation")
# Keys that left the run config, and where they went: an old config fails with the way out
# rather than "unknown key".
MOVED_KEYS = {
    "he-secret-context": (
        "the secret CKKS context is a file on one hospital's disk, so the run config that "
        "the coordinator sends to every node no longer names it. Give each site its own: "
        "node config key 'he-secret-context' (flower-supernode --node-config "
        "'he-secret-context=PATH'), or the file site_secret.ctx in the site's state folder "
        "(node config 'state-dir'; in simulation state-root/<site>)"
    ),
}


@dataclass(frozen=True)
class RunConfig:
    num_server_rounds: int = 3
    seed: int = 0
    # "classification" (a label per image) or "segmentation" (a mask per image: the ViT plus a
    # SAC decoder, core.model.segmentation; num-classes counts the background)
    task: str = "classification"
    decoder_features: int = 16  # segmentation: the SAC decoder's channels at full resolution
    # model
    model_size: str = "micro"
    backbone: str = ""  # safetensors path; "" = a backbone built from backbone-seed
    backbone_seed: int = 0
    num_classes: int = 2
    in_channels: int = 1
    multi_label: bool = False
    head_pool: str = "contrast"  # what the head reads (core.model.sizes.POOLS); see ViTConfig.pool
    head_norm: bool = True  # standardise the pooled features before the linear head
    # LoRA
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: str = "qv"
    lora_mode: str = "ffa"
    # local training
    local_epochs: int = 1
    batch_size: int = 32  # expected batch under DP: larger batches drown less in noise
    max_physical_batch: int = 32
    learning_rate: float = 0.05
    optimizer: str = "sgd"  # momentum 0.9; Adam's per-coordinate scaling amplifies DP noise
    weight_decay: float = 0.0
    device: str = "auto"
    # differential privacy
    dp: bool = True
    target_epsilon: float = 8.0
    target_delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    dp_planned_rounds: int = 0  # rounds the noise is calibrated for; 0 = num-server-rounds
    # data and sites
    data_root: str = ""  # simulation: one sub-folder per site, each with a dataset.json
    sites: str = ""  # comma-separated site folder names; "" = every sub-folder, sorted
    in_plane_size: int = 64
    state_root: str = ""  # simulation: site state (ledger, last release) in state-root/<site>/
    # federation
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_nodes: int = 2
    min_available_nodes: int = 2
    round_timeout: float = 3600.0
    max_examples_per_site: int = 1_000_000  # cap on a reply's claimed example count
    out_dir: str = ""  # absolute path of the run folder; "" = runs/<time> under the cwd
    resume: bool = False
    # homomorphic encryption
    he: bool = False
    he_public_context: str = ""  # the server's; each site's secret context is node-local

    def __post_init__(self) -> None:
        if self.num_server_rounds < 1:
            self._fail("num-server-rounds", self.num_server_rounds, "use 1 or more rounds")
        if self.dp_planned_rounds < 0:
            self._fail("dp-planned-rounds", self.dp_planned_rounds, "use 0 (all rounds) or more")
        if self.task not in TASKS:
            self._fail("task", self.task, f"choose one of {list(TASKS)}")
        if self.decoder_features < 1:
            self._fail("decoder-features", self.decoder_features, "use 1 or more channels")
        if self.model_size not in MODEL_SIZES:
            self._fail("model-size", self.model_size, f"choose one of {sorted(MODEL_SIZES)}")
        if self.num_classes < 2:
            self._fail("num-classes", self.num_classes, "a classifier needs 2 or more classes")
        if self.head_pool not in POOLS:
            self._fail("head-pool", self.head_pool, f"choose one of {list(POOLS)}")
        if self.lora_targets not in LORA_TARGETS:
            self._fail("lora-targets", self.lora_targets, f"choose one of {sorted(LORA_TARGETS)}")
        if self.lora_mode not in ("ffa", "vanilla"):
            self._fail("lora-mode", self.lora_mode, "choose 'ffa' or 'vanilla'")
        if self.accountant not in ACCOUNTANTS:
            self._fail("accountant", self.accountant, f"choose one of {list(ACCOUNTANTS)}")
        if self.device not in ("auto", "cpu", "cuda"):
            self._fail("device", self.device, "choose 'auto', 'cpu' or 'cuda'")
        for key, value in (
            ("fraction-train", self.fraction_train),
            ("fraction-evaluate", self.fraction_evaluate),
        ):
            if not 0.0 < value <= 1.0:
                self._fail(key, value, "use a fraction above 0 and at most 1 (0 samples no node)")
        for key, count in (
            ("min-train-nodes", self.min_train_nodes),
            ("min-available-nodes", self.min_available_nodes),
            ("max-examples-per-site", self.max_examples_per_site),
        ):
            if count < 1:
                self._fail(key, count, "use 1 or more")
        if self.round_timeout < MIN_ROUND_TIMEOUT:
            self._fail(
                "round-timeout",
                self.round_timeout,
                f"use at least {MIN_ROUND_TIMEOUT:.0f} s (seconds, not minutes): a round that "
                "times out is lost",
            )
        if self.in_plane_size < 16 or self.in_plane_size % 16:
            self._fail("in-plane-size", self.in_plane_size, "use a multiple of the patch size 16")
        if self.he and not self.he_public_context:
            self._fail(
                "he",
                self.he,
                "set he-public-context (fedmedvit provision); each site finds its secret "
                "context in its node config or state folder",
            )
        # Sub-settings validate their own ranges; re-raise naming the run-config keys.
        for build in (self.lora, self.training, self.privacy):
            try:
                build()
            except ValueError as err:
                raise ConfigError(f"run config: {err}") from err

    def check_federation(self, num_sites: int) -> None:
        """Refuse a federation setting that cannot work with ``num_sites`` nodes, before any
        round waits on it (Flower waits for ``min-*-nodes`` forever, printing nothing). Flower
        samples ``max(int(num_sites * fraction), min-train-nodes)`` nodes, so with fractions
        above 0 and ``min-train-nodes >= 1`` (checked on construction) every round samples one.

        Raises:
            ConfigError: naming the key and the fix.
        """
        for key, count in (
            ("min-train-nodes", self.min_train_nodes),
            ("min-available-nodes", self.min_available_nodes),
        ):
            if count > num_sites:
                self._fail(
                    key,
                    count,
                    f"the federation has {num_sites} site(s); use at most {num_sites} (no "
                    "round could start)",
                )

    @staticmethod
    def _fail(key: str, value: Any, fix: str) -> None:
        raise ConfigError(f"run config '{key}' = {value!r} is invalid: {fix}")

    @classmethod
    def from_flat(cls, values: Mapping[str, Any], *, source: str = "run config") -> RunConfig:
        """Build from kebab-case keys; unknown keys and wrong types raise ConfigError."""
        return cls(**cls.check_keys(values, source=source))

    @classmethod
    def from_record(
        cls, values: Mapping[str, Any], *, source: str = "run folder config.json"
    ) -> RunConfig:
        """A run folder's ``config.json`` read back (to decrypt or explain a past run's
        result). Keys that have since left the run config (:data:`MOVED_KEYS`) are dropped,
        so a folder written before they moved still opens; no run is started from it, so
        nothing is sent anywhere.

        Raises:
            ConfigError: as :meth:`from_flat`, for any other key or value.
        """
        kept = {k: v for k, v in values.items() if k not in MOVED_KEYS}
        return cls.from_flat(kept, source=source)

    @classmethod
    def check_keys(cls, values: Mapping[str, Any], *, source: str = "run config") -> dict[str, Any]:
        """Field name -> coerced value for kebab-case ``values``: every key known and every
        value of its field's type, without the cross-field checks (so a runner can check its
        overrides before expensive set-up). Raises ConfigError naming the key (and the closest
        valid one)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key in MOVED_KEYS:
                where = MOVED_KEYS[key]
                raise ConfigError(f"{source}: key '{key}' is no longer a run-config key: {where}")
            name = key.replace("-", "_")
            if name not in fields:
                known = [f.replace("_", "-") for f in fields]
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {known}"
                raise ConfigError(f"{source}: unknown key '{key}'{hint}")
            kwargs[name] = _coerce(key, value, type(fields[name].default), source)
        return kwargs

    def to_flat(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    def lora(self) -> LoraSettings:
        return LoraSettings(
            rank=self.lora_rank,
            alpha=self.lora_alpha,
            dropout=self.lora_dropout,
            targets=self.lora_targets,
            mode=self.lora_mode,  # type: ignore[arg-type]
            seed=self.seed,
        )

    def training(self) -> TrainSettings:
        return TrainSettings(
            local_epochs=self.local_epochs,
            batch_size=self.batch_size,
            max_physical_batch=self.max_physical_batch,
            learning_rate=self.learning_rate,
            optimizer=self.optimizer,  # type: ignore[arg-type]
            weight_decay=self.weight_decay,
            multi_label=self.multi_label,
        )

    @property
    def planned_rounds(self) -> int:
        return self.dp_planned_rounds or self.num_server_rounds

    def privacy(self) -> DPSettings:
        return DPSettings(
            target_epsilon=self.target_epsilon,
            target_delta=self.target_delta,
            max_grad_norm=self.max_grad_norm,
            accountant=self.accountant,
        )


def _coerce(key: str, value: Any, expected: type, source: str) -> Any:
    """Accept the TOML scalar types Flower passes; ints are fine where floats are expected."""
    if expected is bool:
        if isinstance(value, bool):
            return value
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif expected is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                raise ConfigError(f"{source}: '{key}' must be a finite number, got {value!r}")
            return float(value)
    elif isinstance(value, expected):
        return value
    raise ConfigError(
        f"{source}: '{key}' must be {expected.__name__}, got {type(value).__name__} {value!r}"
    )
