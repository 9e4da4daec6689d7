"""Evaluation protocols on a frozen or fine-tuned backbone: kNN (`features`), linear probe, semi-supervised."""

from mixmask.evaluation.features import knn_predict  # the public kNN contract (DESIGN.md) at its documented path

__all__ = ["knn_predict"]
