"""Capture of the layers' inputs and arguments: stub layers record what a real pass records."""

import pytest
import torch

from tests.helpers import calibration


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_capture_with_stub_layers_records_the_same_layer_arguments(arch):
    from irr_callback.pipeline.capture import capture_layer_inputs, capture_with_stub_layers
    from irr_callback.targets import find_targets
    from tests.helpers import tiny_model

    model = tiny_model(arch, layers=3)
    batches = calibration(n=4, length=9, pad_right=3)
    _, layers, _ = find_targets(model, None)
    with torch.no_grad():
        real_hidden, real_args = capture_layer_inputs(model, layers, batches)
        stub_hidden, stub_args = capture_with_stub_layers(model, layers, batches)
    assert all(
        isinstance(layer, type(model.model.layers[0] if arch != "gpt2" else model.transformer.h[0]))
        for layer in layers
    )  # the real layers are back
    assert all(torch.equal(a, b) for a, b in zip(real_hidden, stub_hidden))

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
        if isinstance(a, (tuple, list)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        return a == b or type(a) is type(b)  # e.g. cache objects: same kind

    for per_layer_real, per_layer_stub in zip(real_args, stub_args):
        for real, stub in zip(per_layer_real, per_layer_stub):
            assert same(real, stub)
