"""The loss of a task (`task.loss`): one config class per loss, a discriminated union on `name`.

Each class is a key of the rank-side loss registry (launcher.train.losses.LOSSES); the task registry
(config.tasks) says which losses fit a task and which is its default.
"""

from __future__ import annotations

import typing
from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from launcher.config.strict import Strict


class Loss(Strict):
    # the loss compares the model with a frozen reference (DPO): LoRA's base with the adapter disabled, or a
    # frozen copy of the model that the planner counts (launcher.train.tasks.Preference)
    uses_reference: ClassVar[bool] = False


class CrossEntropy(Loss):
    name: Literal["cross_entropy"]
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    class_weights: list[Annotated[float, Field(gt=0)]] | Literal["auto"] | None = Field(
        None, description="Per-class weights, or 'auto' for inverse label frequency in the training split."
    )


class Focal(Loss):
    name: Literal["focal"]
    gamma: float = Field(2.0, ge=0.0, description="Focusing parameter; 0 is plain cross-entropy.")
    alpha: float | None = Field(None, gt=0.0, lt=1.0, description="Weight of the positive class (binary/multi-label).")


class BCE(Loss):
    name: Literal["bce"]
    pos_weight: float | list[Annotated[float, Field(gt=0)]] | None = Field(
        None, description="Weight of positives, one number or one per label."
    )


class MSE(Loss):
    name: Literal["mse"]


class MAE(Loss):
    name: Literal["mae"]


class Huber(Loss):
    name: Literal["huber"]
    delta: float = Field(1.0, gt=0.0)


class DPO(Loss):
    """Direct Preference Optimization (Rafailov et al. 2023) against a frozen reference model."""

    name: Literal["dpo"]
    uses_reference: ClassVar[bool] = True
    beta: float = Field(0.1, gt=0.0, description="Strength of the pull toward the reference model.")
    variant: Literal["sigmoid", "ipo", "hinge"] = Field(
        "sigmoid",
        description="sigmoid: the DPO paper's loss; ipo: squared (Azar et al. 2023, on per-token log-ratios); "
        "hinge: the SLiC hinge.",
    )
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="sigmoid: the probability that a pair's label is flipped (cDPO)."
    )

    @model_validator(mode="after")
    def _smoothing_is_sigmoid(self) -> DPO:
        if self.label_smoothing and self.variant != "sigmoid":
            raise ValueError(f"label_smoothing applies to variant sigmoid only, not {self.variant!r}")
        return self


class ORPO(Loss):
    """Odds Ratio Preference Optimization (Hong et al. 2024): SFT on the chosen answer plus an odds-ratio term;
    no reference model."""

    name: Literal["orpo"]
    beta: float = Field(0.1, gt=0.0, description="Weight of the odds-ratio term (the paper's lambda).")


class SimPO(Loss):
    """Simple Preference Optimization (Meng et al. 2024): length-normalised log-probabilities with a target
    margin; no reference model."""

    name: Literal["simpo"]
    beta: float = Field(2.0, gt=0.0, description="Scale of the length-normalised reward.")
    gamma: float = Field(0.5, ge=0.0, description="Target reward margin between chosen and rejected.")


class BradleyTerry(Loss):
    """Pairwise reward-model loss: -log sigmoid(r_chosen - r_rejected)."""

    name: Literal["bradley_terry"]


LossConfig = Annotated[
    CrossEntropy | Focal | BCE | MSE | MAE | Huber | DPO | ORPO | SimPO | BradleyTerry, Field(discriminator="name")
]

# loss name → its config class: the union above, by name (the default loss of a task is built from it)
LOSS_CONFIGS: dict[str, type[Loss]] = {
    cls.model_fields["name"].annotation.__args__[0]: cls for cls in typing.get_args(typing.get_args(LossConfig)[0])
}
