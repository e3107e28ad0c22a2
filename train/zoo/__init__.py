"""The model zoo: what a model is made of. Text encoder, visual token builders, the trainable vision
blocks, fusions, heads, CRF, losses, the registry that names them, and the two models composed from
them (model.py for tagging, classifier_model.py for sentence classification)."""
