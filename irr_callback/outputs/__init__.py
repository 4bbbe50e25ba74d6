"""What the pipeline's results become: the realigned model's directory (gathered where sharded,
written atomically), the Trainer's realigned `checkpoint-N`, the model card, tables and plots.

The pipeline never imports this package; `inputs/` never imports it either
(tests/test_import_graph.py). The atomic-write primitives and `write_output`, which the offline
pipeline also needs, live below both in `saving.py`.
"""
