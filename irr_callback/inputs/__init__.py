"""What the pipeline is fed: the safety inputs (safety vector, Fisher scores, the base model's own
refusals to default harmful prompts, a short harmful fine-tune), the data they are made from, the
snapshot of the base weights, and the `.irr` safetensors files that cache them.

The pipeline never imports this package: it receives tensors and batches. `outputs/` never imports
it either (tests/test_import_graph.py).
"""
