"""Configurations of the stochastic heads and their loss (SPEC sections 3 and 4).

These dataclasses are the one description of a method that the CLI, the
trainer, the predictor, the study grid and the report share. ``RunConfig.tag`` names a fine-tuning
run in the manifest and in the workdir: the head's readable tag
(``HeadConfig.tag``), then a suffix for every option of the loss and of the
training that differs from its default (see :meth:`RunConfig.tag`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from mobseg.errors import ConfigurationError, UnknownNameError

#: The five methods, in the order of the paper's tables.
METHOD_NAMES: tuple[str, ...] = ("deterministic", "diagonal", "lowrank", "single-basis", "mob")

#: Display names used in tables and figures.
METHOD_LABELS: dict[str, str] = {
    "deterministic": "Deterministic",
    "diagonal": "Diagonal",
    "lowrank": "Diagonal + Low-rank",
    "single-basis": "Single-Basis",
    "mob": "Mixture-of-Bases",
}

NOISE_MODES: tuple[str, ...] = ("voxel", "block", "global")
MIXING_MODES: tuple[str, ...] = ("soft", "hard")
MC_LOSSES: tuple[str, ...] = ("mean", "logsumexp")
#: How voxel noise is drawn for single-basis and mob (same distribution, see
#: mobseg.core.distributions): per-voxel C x C Cholesky (C normals per voxel) or
#: the literal factor z1, z2 (C + R normals per voxel).
SAMPLERS: tuple[str, ...] = ("cholesky", "factor")
#: Which annotator's mask a fine-tuning step learns: ``0`` (the nnU-Net label)
#: or ``all`` (a random annotator per case per iteration).
ANNOTATOR_CHOICES: tuple[str, ...] = ("0", "all")


def check_method(name: str) -> str:
    """Return ``name`` if it is a method, else raise UnknownNameError."""
    if name not in METHOD_NAMES:
        raise UnknownNameError("method", name, METHOD_NAMES)
    return name


@dataclass(frozen=True)
class HeadConfig:
    """What a stochastic head is.

    Attributes:
        method: One of :data:`METHOD_NAMES`.
        num_classes: C, classes including background.
        rank: R, columns of the low-rank factor / of each basis.
        bases: M, number of bases (mob only).
        partitions: P, blocks per spatial axis (mob only).
        noise: ``voxel`` (default), ``block`` (mob, single-basis) or
            ``global`` (single-basis only): how z2 is shared.
        mixing: ``soft`` (weighted sum of bases) or ``hard`` (argmax basis with
            straight-through gradients), mob only.
        temperature: tau of the weighting softmax (mob only).
        eps: floor added to softplus for every variance.
        sampler: ``cholesky`` (default) or ``factor``: how ``voxel`` noise of
            single-basis and mob is drawn. Both draw exactly the same
            distribution; ``factor`` draws the paper's z2 in R^R per voxel
            literally (R/C times more random numbers and memory).
    """

    method: str
    num_classes: int = 2
    rank: int = 16
    bases: int = 3
    partitions: int = 4
    noise: str = "voxel"
    mixing: str = "soft"
    temperature: float = 0.3
    eps: float = 1e-5
    sampler: str = "cholesky"

    def __post_init__(self) -> None:
        check_method(self.method)
        if self.noise not in NOISE_MODES:
            raise UnknownNameError("noise mode", self.noise, NOISE_MODES)
        if self.mixing not in MIXING_MODES:
            raise UnknownNameError("mixing mode", self.mixing, MIXING_MODES)
        if self.num_classes < 2:
            raise ConfigurationError(f"num_classes must be >= 2, got {self.num_classes}.")
        for name in ("rank", "bases", "partitions"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if self.temperature <= 0:
            raise ConfigurationError(f"temperature must be > 0, got {self.temperature}.")
        if self.noise != "voxel" and self.method not in ("single-basis", "mob"):
            raise ConfigurationError(
                f"--noise {self.noise} applies to single-basis and mob only, not {self.method}."
            )
        if self.noise == "global" and self.method != "single-basis":
            raise ConfigurationError("--noise global applies to single-basis only.")
        if self.sampler not in SAMPLERS:
            raise UnknownNameError("sampler", self.sampler, SAMPLERS)
        if self.sampler != "cholesky" and (
            self.method not in ("single-basis", "mob") or self.noise != "voxel"
        ):
            raise ConfigurationError(
                f"sampler {self.sampler!r} applies to single-basis and mob with voxel noise only."
            )
        if self.eps <= 0:
            raise ConfigurationError(f"eps must be > 0, got {self.eps}.")

    @property
    def stochastic(self) -> bool:
        return self.method != "deterministic"

    def tag(self) -> str:
        """Short name of the head, e.g. ``mob-b3-r16``; non-default options are appended.

        Every option that changes the head appears, except ``eps`` (no CLI
        option), which :meth:`RunConfig.tag` hashes when it is not the default.
        ``partitions`` appears where it is used: mob, and single-basis with
        ``block`` noise.
        """
        m = self.method
        if m in ("deterministic", "diagonal"):
            tag = m
        elif m in ("lowrank", "single-basis"):
            tag = f"{m}-r{self.rank}"
            if m == "single-basis" and self.noise == "block" and self.partitions != 4:
                tag += f"-p{self.partitions}"
        else:
            tag = f"mob-b{self.bases}-r{self.rank}"
            if self.partitions != 4:
                tag += f"-p{self.partitions}"
            if self.mixing != "soft":
                tag += f"-{self.mixing}"
            if self.temperature != 0.3:
                tag += f"-t{self.temperature:g}"
        if self.noise != "voxel":
            tag += f"-{self.noise}"
        if self.sampler != "cholesky":
            tag += f"-{self.sampler}"
        if self.num_classes != 2:
            tag += f"-c{self.num_classes}"
        return tag

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LossConfig:
    """Weights and options of the fine-tuning loss (SPEC section 4).

    Attributes:
        samples: k, Monte-Carlo samples of the logits per step.
        mc_loss: ``mean`` (average of the k CE+Dice terms, the paper) or
            ``logsumexp`` (the SSN objective on the CE).
        antithetic: draw antithetic pairs (logsumexp objective).
        lambda_ce, lambda_dice: weights of CE and soft Dice per sample.
        lambda_kl: weight of KL(N(mu, I) || N(mu, diag(D))).
        lambda_orth: weight of the orthogonality of the bases (mob, M >= 2).
        lambda_w: weight of the weights' negative entropy (mob).
        batch_dice: nnU-Net's batch Dice (sums over the batch before the
            ratio); set it from the plans' ``batch_dice`` of the configuration.
        smooth: Dice smoothing (nnU-Net: 1e-5).
    """

    samples: int = 5
    mc_loss: str = "mean"
    antithetic: bool = False
    lambda_ce: float = 1.0
    lambda_dice: float = 1.0
    lambda_kl: float = 5e-4
    lambda_orth: float = 1.0
    lambda_w: float = 0.05
    batch_dice: bool = True
    smooth: float = 1e-5

    def __post_init__(self) -> None:
        if self.mc_loss not in MC_LOSSES:
            raise UnknownNameError("Monte-Carlo loss", self.mc_loss, MC_LOSSES)
        if self.samples < 1:
            raise ConfigurationError(f"--samples must be >= 1, got {self.samples}.")
        if self.antithetic and self.samples % 2:
            raise ConfigurationError("Antithetic sampling needs an even --samples.")
        if self.smooth < 0:
            raise ConfigurationError(f"Dice smooth must be >= 0, got {self.smooth}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Defaults of the training options that :class:`RunConfig` hashes.
_DEFAULT_LR = 1e-4
_DEFAULT_WEIGHT_DECAY = 1e-4
#: Loss options a deterministic run does not use (its k samples are identical,
#: and it has no variance, bases or weights to regularise).
_STOCHASTIC_ONLY = ("samples", "mc_loss", "antithetic", "lambda_kl", "lambda_orth", "lambda_w")


@dataclass(frozen=True)
class RunConfig:
    """Everything besides the seed that changes a fine-tuned model: its identity.

    Attributes:
        head: The head.
        loss: The loss (``batch_dice`` is not part of the identity: the trainer
            sets it from the backbone's plans).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        epochs: Fine-tuning epochs; None = the preset's. Give None (not the
            preset's value) for the preset's schedule: see
            :func:`mobseg.stages.finetune.run_config`, which normalises it.
        iterations: Iterations per epoch; None = the preset's.
        val_every: Validation interval (it selects ``checkpoint_best.pth``);
            None = the preset's.
        annotators: ``0`` or ``all`` (:data:`ANNOTATOR_CHOICES`).
        freeze_backbone: Only the head learns; the pretrained backbone's
            weights stay as they are (as SegWithU trains its head).
        decoder_dropout: Rate of the MC-dropout variant's channel dropout in
            the decoder (0 = none; ``finetune --mc-dropout``).
    """

    head: HeadConfig
    loss: LossConfig = field(default_factory=lambda: LossConfig())
    lr: float = _DEFAULT_LR
    weight_decay: float = _DEFAULT_WEIGHT_DECAY
    epochs: int | None = None
    iterations: int | None = None
    val_every: int | None = None
    annotators: str = "0"
    freeze_backbone: bool = False
    decoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        check_annotators(self.annotators)
        if self.freeze_backbone and not self.head.stochastic:
            raise ConfigurationError(
                "--freeze-backbone leaves the deterministic method nothing to train (its head "
                "is the backbone's own segmentation layer); the frozen backbone's prediction "
                "is `mobseg predict --method backbone`."
            )
        if not 0.0 <= self.decoder_dropout < 1.0:
            raise ConfigurationError(
                f"--dropout-rate must lie in [0, 1), got {self.decoder_dropout}."
            )

    def hashed_options(self) -> dict[str, Any]:
        """The non-default options that have no readable part in :meth:`tag`."""
        out: dict[str, Any] = {}
        default_loss = LossConfig()
        readable = {"samples", "mc_loss", "antithetic", "batch_dice"}
        for name in LossConfig.__dataclass_fields__:
            if name in readable or (not self.head.stochastic and name in _STOCHASTIC_ONLY):
                continue
            value = getattr(self.loss, name)
            if value != getattr(default_loss, name):
                out[name] = value
        if self.head.eps != HeadConfig("mob").eps:
            out["eps"] = self.head.eps
        if self.lr != _DEFAULT_LR:
            out["lr"] = self.lr
        if self.weight_decay != _DEFAULT_WEIGHT_DECAY:
            out["weight_decay"] = self.weight_decay
        for name in ("epochs", "iterations", "val_every"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    def suffix(self) -> str:
        """What :meth:`tag` appends to the head's tag ("" for the defaults)."""
        parts: list[str] = []
        loss = self.loss
        if self.head.stochastic:
            if loss.mc_loss != "mean":
                parts.append("lse")
            if loss.samples != LossConfig().samples:
                parts.append(f"k{loss.samples}")
            if loss.antithetic:
                parts.append("anti")
        if self.annotators != "0":
            parts.append(f"ann{self.annotators}")
        if self.freeze_backbone:
            parts.append("frozen")
        if self.decoder_dropout > 0:
            parts.append(f"mcd{self.decoder_dropout:g}")
        hashed = self.hashed_options()
        if hashed:
            text = json.dumps(hashed, sort_keys=True, separators=(",", ":"))
            parts.append("x" + hashlib.sha256(text.encode()).hexdigest()[:8])
        return "".join(f"-{p}" for p in parts)

    def tag(self) -> str:
        """The run's name in the manifest and the workdir.

        ``HeadConfig.tag()`` followed by, in this order and only when they
        differ from the defaults: ``-lse`` (``mc_loss`` logsumexp), ``-k<k>``
        (samples per step), ``-anti`` (antithetic pairs), ``-annall``
        (``--annotators all``), ``-frozen`` (``--freeze-backbone``),
        ``-mcd<rate>`` (``--mc-dropout``, decoder dropout), and
        ``-x<8 hex>``, the first 8 hex digits of the SHA-256 of the JSON
        (sorted keys, no spaces) of every other non-default option
        (:meth:`hashed_options`: lambdas, Dice smoothing, eps, lr, weight
        decay, and epochs, iterations or validation interval other than the
        preset's). The paper's configurations keep their
        readable tags (``mob-b3-r16``). A deterministic run ignores the
        options it does not use (samples, objective, KL, orthogonality and
        entropy weights), so they do not split it.
        """
        return self.head.tag() + self.suffix()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["head"], d["loss"] = self.head.to_dict(), self.loss.to_dict()
        return d


def check_annotators(value: str) -> str:
    """Return ``value`` if it is an annotator choice, else raise UnknownNameError."""
    if value not in ANNOTATOR_CHOICES:
        raise UnknownNameError("annotator choice", value, ANNOTATOR_CHOICES)
    return value
