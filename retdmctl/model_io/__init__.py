"""A trained model, read back and used: :mod:`~retdmctl.model_io.checkpoint` rebuilds
the image model and its decision rule (thresholds and the neighbour vote) from a
checkpoint; :mod:`~retdmctl.model_io.scoring` scores batches of images or cached
inputs into probabilities and embeddings. Eval, predict, the report, export and the
training stages' validation all go through these two; neither imports
``retdmctl.training``."""
