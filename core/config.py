"""The run configuration: Flower's flat ``run_config`` turned once into a validated dataclass.

Every key of ``[tool.flwr.app.config]`` (and of ``--run-config`` overrides) maps to one field
here, kebab-case to snake_case. Unknown keys, wrong types and impossible values fail before any
training, with a message that names the key and the fix.

The fields are declared in sections (:data:`SECTIONS`: model, lora, train, dp, he, federation,
data) that group the help and the did-you-mean hints, while the keys stay flat: every
scenario, doc and ``--run-config 'lora-rank=16'`` keeps working, and Flower's run config takes
only scalars anyway. A default that a settings dataclass uses (``LoraSettings``,
``TrainSettings``, ``DPSettings``, ``ViTConfig``) is read from that dataclass, its one home;
``pyproject.toml`` repeats every default because Flower needs them there (a test keeps the two
equal).

Imports only the torch-free settings modules, so checking a run config costs no torch import.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from core.adapters.settings import LORA_TARGETS, LoraSettings
from core.model.sizes import HEAD_NORMS, MODEL_SIZES, POOLS, ViTConfig
from core.privacy.plan import ACCOUNTANTS, DPSettings
from core.training.settings import TrainSettings


class ConfigError(ValueError):
    """A run-config key is unknown, of the wrong type, or has an impossible value."""


# Below this a round cannot finish: one round of the smallest model on phantom data takes
# 10-25 s here (README), and a timed-out round is lost. Flower's own default is 3600 s.
MIN_ROUND_TIMEOUT = 30.0
TASKS = ("classification", "segmentation")
HEAD_SHARING = ("shared", "local", "shared+local")
AUTO_HEAD_SHARING = {"classification": "shared+local", "segmentation": "local"}
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


SECTION_NAMES = ("model", "lora", "train", "dp", "he", "federation", "data")


def _key(section: str, default: Any) -> Any:
    """A run-config field in ``section`` (kept in the field's metadata; see :data:`SECTIONS`)
    whose default is the run config's own: no other dataclass holds this setting."""
    if section not in SECTION_NAMES:
        raise ValueError(f"unknown run-config section {section!r}")
    return dataclasses.field(default=default, metadata={"section": section})


def _owned(section: str, owner: type, name: str) -> Any:
    """A run-config field whose default is the default of ``owner``'s field ``name``: the
    settings dataclass that uses the value is its one home, so the run and a direct caller of
    that dataclass cannot drift apart."""
    defaults = {f.name: f.default for f in dataclasses.fields(owner)}
    return _key(section, defaults[name])


@dataclass(frozen=True)
class RunConfig:
    """Flat fields (``lora-rank``, not ``lora.rank``: every scenario, doc and ``--run-config``
    uses these keys) declared in sections, each with one home for its default."""

    # model
    # "classification" (a label per image) or "segmentation" (a mask per image: the ViT plus a
    # SAC decoder, core.model.segmentation; num-classes counts the background)
    task: str = _key("model", "classification")
    decoder_features: int = _key("model", 16)  # segmentation: the decoder's full-res channels
    model_size: str = _key("model", "micro")
    backbone: str = _key("model", "")  # safetensors path; "" = built from backbone-seed
    backbone_seed: int = _key("model", 0)
    num_classes: int = _key("model", 2)
    in_channels: int = _owned("model", ViTConfig, "in_channels")
    # The run's head, set on top of the backbone's stored architecture. ViTConfig's own defaults
    # ("mean", no norm) say what a checkpoint without these fields meant, so they stay apart.
    head_pool: str = _key("model", "stats")  # what the head reads (core.model.pooling.POOLS)
    # How the pooled features are conditioned (ViTConfig.head_norm); "auto" = "reference" when
    # the backbone file carries a reference for head-pool (fedmedvit pretrain writes one),
    # else "layer".
    head_norm: str = _key("model", "auto")
    # lora
    lora_rank: int = _owned("lora", LoraSettings, "rank")
    lora_alpha: int = _owned("lora", LoraSettings, "alpha")
    lora_dropout: float = _owned("lora", LoraSettings, "dropout")
    lora_targets: str = _owned("lora", LoraSettings, "targets")
    lora_mode: str = _owned("lora", LoraSettings, "mode")
    # train (local training at a site)
    local_epochs: int = _owned("train", TrainSettings, "local_epochs")
    batch_size: int = _owned("train", TrainSettings, "batch_size")
    max_physical_batch: int = _owned("train", TrainSettings, "max_physical_batch")
    learning_rate: float = _owned("train", TrainSettings, "learning_rate")
    optimizer: str = _owned("train", TrainSettings, "optimizer")
    weight_decay: float = _owned("train", TrainSettings, "weight_decay")
    multi_label: bool = _owned("train", TrainSettings, "multi_label")
    device: str = _key("train", "auto")
    # dp (differential privacy)
    dp: bool = _key("dp", True)
    target_epsilon: float = _owned("dp", DPSettings, "target_epsilon")
    target_delta: float = _owned("dp", DPSettings, "target_delta")
    max_grad_norm: float = _owned("dp", DPSettings, "max_grad_norm")
    accountant: str = _owned("dp", DPSettings, "accountant")
    dp_planned_rounds: int = _key("dp", 0)  # rounds the noise is planned for; 0 = all rounds
    # he (homomorphic encryption)
    he: bool = _key("he", False)
    he_public_context: str = _key("he", "")  # the server's; each site's secret is node-local
    # federation
    num_server_rounds: int = _key("federation", 3)
    seed: int = _key("federation", 0)
    fraction_train: float = _key("federation", 1.0)
    fraction_evaluate: float = _key("federation", 1.0)
    min_train_nodes: int = _key("federation", 2)
    min_available_nodes: int = _key("federation", 2)
    round_timeout: float = _key("federation", 3600.0)
    max_examples_per_site: int = _key("federation", 1_000_000)  # cap on a claimed count
    # Where the head goes (HEAD_SHARING; "auto": "shared+local" for a classifier, "local" for a
    # segmentation model's decoder). "shared+local" (FedRoD-style): the head is averaged with
    # the adapters and each site adds the scores of a personal head it keeps; "local" (FedPer):
    # each site keeps the head it trains, only the adapters are averaged; "shared": the head
    # is averaged with the adapters. README, learning quality, has the measurements.
    head_sharing: str = _key("federation", "auto")  # see keeps_local_head
    out_dir: str = _key("federation", "")  # absolute run folder; "" = runs/<time> under the cwd
    resume: bool = _key("federation", False)
    # data (and each simulated site's state)
    data_root: str = _key("data", "")  # simulation: one sub-folder per site with a dataset.json
    sites: str = _key("data", "")  # comma-separated site folder names; "" = every one, sorted
    in_plane_size: int = _key("data", 64)
    state_root: str = _key("data", "")  # simulation: site state in state-root/<site>/

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
        if self.head_sharing not in ("auto", *HEAD_SHARING):
            self._fail(
                "head-sharing", self.head_sharing, f"choose one of {['auto', *HEAD_SHARING]}"
            )
        if self.head_sharing == "auto":  # resolved once, so every reader sees the same mode
            object.__setattr__(self, "head_sharing", AUTO_HEAD_SHARING[self.task])
        if self.has_personal_head and self.task != "classification":
            self._fail(
                "head-sharing",
                self.head_sharing,
                f"a {self.task} model keeps its whole decoder ('local') or averages it ('shared')",
            )
        if self.head_norm not in ("auto", *HEAD_NORMS):
            self._fail("head-norm", self.head_norm, f"choose one of {['auto', *HEAD_NORMS]}")
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

    @property
    def keeps_local_head(self) -> bool:
        """Whether each site keeps a part of the head (head-sharing "local": a classifier's
        head, a segmentation model's decoder and head; "shared+local": a classifier's personal
        head; ``core.federation.local_head.local_prefixes``)."""
        return self.head_sharing in ("local", "shared+local")

    @property
    def has_personal_head(self) -> bool:
        """Whether the classifier head carries a personal read-out each site keeps
        (head-sharing "shared+local"; ``core.model.vit.ClassifierHead``)."""
        return self.head_sharing == "shared+local"

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
        if isinstance(kept.get("head-norm"), bool):  # before head-norm modes: a LayerNorm or none
            kept["head-norm"] = "layer" if kept["head-norm"] else "none"
        kept.setdefault("head-sharing", "shared")  # runs before head-sharing averaged the head
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
                hint = (
                    f"; did you mean '{close[0]}' (section {section_of(close[0])})?"
                    if close
                    else f"; valid keys by section: {format_sections(defaults=False)}"
                )
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


# Section -> its kebab-case keys, in declaration order: for grouped help and error messages.
SECTIONS: dict[str, tuple[str, ...]] = {
    section: tuple(
        f.name.replace("_", "-")
        for f in dataclasses.fields(RunConfig)
        if f.metadata["section"] == section
    )
    for section in SECTION_NAMES
}


def section_of(key: str) -> str:
    """The section of a kebab-case run-config key (KeyError for an unknown key)."""
    return next(section for section, keys in SECTIONS.items() if key in keys)


def format_sections(*, defaults: bool = True) -> str:
    """Every key grouped by section: one line a section (``model: task, ...; lora: ...``)
    for an error message, or with ``defaults`` one ``key = default`` line a key, TOML-style,
    for ``--help``."""
    if not defaults:
        return "; ".join(f"{section}: {', '.join(keys)}" for section, keys in SECTIONS.items())
    # The declared defaults, not an instance's: "auto" is resolved per task on construction.
    values = {f.name.replace("_", "-"): f.default for f in dataclasses.fields(RunConfig)}
    lines = []
    for section, keys in SECTIONS.items():
        lines.append(f"{section}:")
        lines += [f"  {key} = {_toml(values[key])}" for key in keys]
    return "\n".join(lines)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f'"{value}"' if isinstance(value, str) else repr(value)


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
