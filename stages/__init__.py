"""The pipeline's stages, in the order ``retdmctl run`` runs them."""

from retdmctl.pipeline import Stage
from stages import classifier, evaluate, ingest, joint, knn, metric

PIPELINE: list[Stage] = [ingest.STAGE, knn.STAGE, classifier.STAGE, metric.STAGE, joint.STAGE, evaluate.STAGE]
BY_NAME: dict[str, Stage] = {s.name: s for s in PIPELINE}
