"""Adapted models as ordinary modules: to_module(), torch.export, ONNX (onnxruntime gives the
same outputs) and the weights-only model.safetensors of a run."""

from __future__ import annotations

import json

import pytest
import torch
from models import make, write_cfg
from safetensors.torch import load_file
from torch import nn

import metattn as mt


def _onnx_outputs(module: nn.Module, x: torch.Tensor, path) -> torch.Tensor:
    ort = pytest.importorskip("onnxruntime")
    torch.onnx.export(module, (x,), dynamo=True).save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


def test_maml_adapted_transformer_exports_to_onnx(tmp_path):
    model, batch = make("transformer")
    learner = mt.MAML(model, inner_lr=0.3, inner_steps=2)
    adapted = learner.adapt(batch.support_x[0], batch.support_y[0])
    module = adapted.to_module()
    x = batch.query_x[0]
    want = adapted(x)
    torch.testing.assert_close(module(x), want, rtol=0, atol=1e-6)
    # the task's parameters, not the meta-learned ones
    assert not torch.allclose(module(x), model.eval()(x))
    torch.testing.assert_close(torch.export.export(module, (x,)).module()(x), want,
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(_onnx_outputs(module, x, tmp_path / "maml.onnx"), want,
                               rtol=0, atol=1e-5)


def test_to_module_keeps_batch_statistics_of_a_running_stat_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        model[1].running_mean.fill_(5.0)  # statistics the inner loop never uses
    learner = mt.MAML(model, inner_lr=0.1).eval()
    sx, sy, qx = torch.randn(6, 4), torch.randint(0, 3, (6,)), torch.randn(5, 4)
    adapted = learner.adapt(sx, sy)
    torch.testing.assert_close(adapted.to_module()(qx), adapted(qx))
    assert torch.equal(model[1].running_mean, torch.full((8,), 5.0))  # the model untouched


def test_protonet_encoder_exports_to_onnx(tmp_path):
    torch.manual_seed(0)
    learner = mt.ProtoNet(mt.Conv4(1, 5, hidden=8, image_size=28)).eval()
    x = torch.rand(10, 1, 28, 28)
    with torch.no_grad():
        want = learner.encode(x)
    torch.testing.assert_close(_onnx_outputs(learner.encoder(), x,
                                             tmp_path / "encoder.onnx"),
                               want, rtol=0, atol=1e-5)


def test_a_run_writes_its_weights_with_plain_names(tmp_path):
    cfg = mt.load_config(write_cfg(tmp_path, train__steps=3, train__eval_every=0))
    mt.train(cfg, tmp_path / "run")
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    _, learner = mt.load_run(tmp_path / "run")
    assert weights.keys() == learner.model.state_dict().keys()
    for k, v in learner.model.state_dict().items():
        torch.testing.assert_close(weights[k], v)
    fresh = mt.MLP(1, [16, 16], 1)
    fresh.load_state_dict(weights)  # the user's own module takes them as they are
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 3
