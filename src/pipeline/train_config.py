"""The train stage's options: typed, bounded and checked together (:class:`TrainConfig`).

Importable without torch, so that the workflow checks every task's training options before any
job starts; the names a user writes (methods, flow families, embeddings, schedules, loadings)
are defined here and the modules that build them import them from here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Literal

from pipeline.architecture import AUTO, auto_embedding, auto_flow
from pipeline.options import CALIBRATION_ONLY, SEED_MAX, Options, OptionsError, option

if TYPE_CHECKING:
    from pipeline.tasks import Task

# "npe": a conditional normalizing flow, trained by likelihood; "fmpe": a vector field trained
# by flow matching (pipeline.models.flow_matching); "nle": a conditional flow over x given theta.
METHODS = ("npe", "fmpe", "nle")
# Density families (pipeline.models.flows builds them with zuko) and those of them that are
# mixtures of Gaussians, with components instead of stacked transformations.
FLOW_FAMILIES = ("nsf", "maf", "naf", "mdn")
MIXTURES = ("mdn",)
EMBEDDINGS = ("mlp", "cnn", "cnn_invariant", "identity")
# "plateau" halves the step after lr_patience epochs without improvement; "cosine" anneals it
# to zero over max_epochs (one step per epoch); "constant" keeps it (pipeline.models.npe).
LR_SCHEDULES = ("plateau", "cosine", "constant")
LOADINGS = ("auto", "memory", "stream")
# Sinusoidal features of the time FMPE's vector field sees (pipeline.models.flow_matching).
TIME_FEATURES = 16
# Options of a normalizing flow that FMPE's vector field has no use for.
NPE_ONLY = ("flow", "transforms", "components")
# Options of the embedding of x, which NLE (a flow over x itself) has no use for.
EMBEDDING_ONLY = ("embedding", "embedding_dim", "embedding_hidden")
# Options of FMPE's vector field, which the flows of NPE and NLE have no use for.
FMPE_ONLY = ("time_features",)
# The correction for the rounds' proposal: NLE's likelihood does not depend on the proposal, and
# FMPE's loss has no density to normalise.
PROPOSAL_ONLY = ("proposal_draws", "proposal_rows")
# Lightning's names; the mixed ones run matrix products in half precision on a GPU.
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


@dataclass(frozen=True)
class TrainConfig(Options):
    """Hyper-parameters of training; every field shapes the trained weights."""

    method: Literal[METHODS] = option(
        "npe",
        help="npe: a normalizing flow; fmpe: a flow-matching vector field; nle: a flow over x "
        "(the likelihood), sampled by MCMC",
    )
    flow: Literal[(AUTO, *FLOW_FAMILIES)] = option(
        AUTO,
        help="flow family (zuko; mdn: a mixture of Gaussians); auto: nsf, or maf from 8 "
        "parameters and for nle",
    )
    transforms: int = option(3, minimum=1, help="flow transformations, for npe and nle")
    flow_hidden: tuple[int, ...] = option(
        (64, 64),
        minimum=1,
        help="hidden widths of the flow's conditioners, the mdn's network or fmpe's vector "
        "field; []: linear",
    )
    components: int = option(4, minimum=1, help="mdn: Gaussians in the mixture")
    time_features: int = option(
        TIME_FEATURES,
        minimum=1,
        help="fmpe: sinusoidal features of the time, 0.1 to 10 half-turns",
    )
    embedding: Literal[(AUTO, *EMBEDDINGS)] = option(
        AUTO, help="embedding network of x; auto: mlp, or x itself from 8 parameters (x <= 64)"
    )
    embedding_dim: int = option(32, minimum=1, help="width of the embedding")
    embedding_hidden: tuple[int, ...] = option(
        (64, 64), minimum=1, help="hidden widths of the embedding"
    )
    ensemble: int = option(4, minimum=1, help="flows trained side by side (their mixture)")
    proposal_draws: int = option(
        16,
        minimum=0,
        help="npe on rounds' simulations (--truncation): draws of q(theta | x) per pair that "
        "normalise the loss over the rounds' proposal; 0: the plain loss",
    )
    proposal_rows: int = option(
        64,
        minimum=1,
        help="npe on rounds' simulations: pairs of each batch whose normaliser is estimated "
        "(the draws cost more than the loss)",
    )
    calibration: float = option(
        0.0,
        minimum=0,
        help="npe: weight of a penalty on over-confidence, the highest-density regions' "
        "undercoverage of the training pairs (Falkiewicz et al. 2023); 0: none",
    )
    calibration_draws: int = option(
        8,
        minimum=2,
        help="npe with calibration: draws of q(theta | x) per pair that place its true theta",
    )
    calibration_rows: int = option(
        64,
        minimum=2,
        help="npe with calibration: pairs of each batch whose credibilities are compared with "
        "the uniform's quantiles (the draws cost more than the loss)",
    )
    batch_size: int = option(256, minimum=1, help="samples per batch and process")
    learning_rate: float = option(1e-3, exclusive_minimum=0, help="AdamW step size")
    lr_schedule: Literal[LR_SCHEDULES] = option("plateau", help="step size schedule")
    weight_decay: float = option(0.01, minimum=0, help="AdamW weight decay")
    gradient_clip: float = option(0.0, minimum=0, help="largest gradient norm (0: none)")
    max_epochs: int = option(200, minimum=1, help="upper bound on epochs")
    max_time: float = option(0.0, minimum=0, help="upper bound in minutes (0: none)")
    patience: int = option(20, minimum=1, help="early-stopping patience (epochs)")
    val_fraction: float = option(
        0.1, exclusive_minimum=0, exclusive_maximum=1, help="held-out fraction for validation"
    )
    loading: Literal[LOADINGS] = option("auto", help="memory, stream or auto")
    seed: int = option(
        0, minimum=0, maximum=SEED_MAX, help="seed of initialisation, split and batches"
    )
    precision: Literal[PRECISIONS] = option("32-true", help="Lightning precision")
    compile: bool = option(False, help="compile the flow's log-density (torch.compile)")
    devices: int = option(1, minimum=1, help="processes Lightning starts without a launcher")
    accelerator: Literal["cpu", "gpu", "auto"] = option("cpu", help="Lightning accelerator")
    num_workers: int = option(0, minimum=0, help="DataLoader workers per rank")

    def check(self, source: str) -> None:
        if self.precision != "32-true" and self.accelerator == "cpu":
            raise OptionsError(
                f"{source}: precision {self.precision!r} needs a GPU (accelerator: gpu); "
                "on CPU use 32-true"
            )
        # Options the method has no use for, why, and the method that has them: set, they would
        # silently do nothing.
        unused = {
            "npe": [(FMPE_ONLY, "an option of fmpe's vector field", "fmpe")],
            "nle": [
                (
                    EMBEDDING_ONLY,
                    "nle's flow models x itself given theta, with no embedding",
                    "npe",
                ),
                (FMPE_ONLY, "an option of fmpe's vector field", "fmpe"),
                (
                    PROPOSAL_ONLY,
                    "a likelihood does not depend on the proposal of the parameters",
                    "npe",
                ),
                (CALIBRATION_ONLY, "a likelihood has no credible regions to calibrate", "npe"),
            ],
            "fmpe": [
                (
                    NPE_ONLY,
                    "options of npe's normalizing flows; fmpe's vector field takes "
                    "its widths from flow_hidden",
                    "npe",
                ),
                (
                    PROPOSAL_ONLY,
                    "the flow-matching loss has no density to normalise over a proposal",
                    "npe",
                ),
                (
                    CALIBRATION_ONLY,
                    "a vector field's densities each take an ODE solve, too dear per step",
                    "npe",
                ),
            ],
        }
        defaults = {f.name: f.default for f in fields(self)}
        for names, why, method in unused[self.method]:
            other = [name for name in names if getattr(self, name) != defaults[name]]
            if other:
                raise OptionsError(
                    f"{source}: method {self.method} has no {' or '.join(other)} ({why}): "
                    f"leave them at their defaults or set method: {method}"
                )
        if self.flow in MIXTURES and self.transforms != defaults["transforms"]:
            raise OptionsError(
                f"{source}: flow {self.flow} is a mixture with no transformations; leave "
                "transforms at its default and set components"
            )
        if self.flow not in MIXTURES and self.components != defaults["components"]:
            raise OptionsError(
                f"{source}: components counts the Gaussians of flow mdn, not set here "
                f"(flow {self.flow}); leave it at its default or set flow: mdn"
            )
        if self.embedding in ("cnn", "cnn_invariant") and not self.embedding_hidden:
            raise OptionsError(
                f"{source}: embedding {self.embedding} takes its stages' channels from "
                "embedding_hidden, which is empty; give at least one, e.g. [8, 16, 32, 64]"
            )
        if self.method == "fmpe" and not self.flow_hidden:
            raise OptionsError(
                f"{source}: method fmpe's vector field needs at least one hidden layer, but "
                "flow_hidden is empty (a linear conditioner is npe's or nle's); set "
                "flow_hidden, e.g. [128, 128, 128, 128]"
            )
        if self.method == "fmpe" and self.compile:
            raise OptionsError(
                f"{source}: compile is not available with method fmpe (its losses draw from a "
                "generator at each step); set compile: false"
            )

    def for_task(self, task: Task) -> TrainConfig:
        """These options with ``auto`` replaced by what it stands for on ``task``'s shapes
        (:mod:`pipeline.architecture`); an option the method refuses stays ``auto``."""
        changes = {}
        if self.flow == AUTO and self.method != "fmpe":
            changes["flow"] = auto_flow(self.method, len(task.parameter_names))
        if self.embedding == AUTO and self.method != "nle":
            changes["embedding"] = auto_embedding(len(task.parameter_names), tuple(task.x_shape))
        return self.replaced(changes, source="auto") if changes else self

    def shaping(self, searched: Iterable[str] = ()) -> dict[str, Any]:
        """The fields that shape the weights (not where they run): the identity of checkpoints,
        search trials and a search's choice. Without the penalty on over-confidence its options
        shape nothing and are left out, so that runs and searches without it keep the identity
        they had without those options, unless ``searched`` (the options a search varies) holds
        one of them: then trials with the penalty train with the base's other options of it."""
        where = ("devices", "accelerator", "num_workers", "compile", "max_time")
        if self.calibration == 0 and not set(searched) & set(CALIBRATION_ONLY):
            where += CALIBRATION_ONLY
        return {k: v for k, v in asdict(self).items() if k not in where}
