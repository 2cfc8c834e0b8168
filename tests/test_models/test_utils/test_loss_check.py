"""The non-finite check: one host read a step, agreement between processes, AMP.

fp16 loss scaling: our check looks at the losses, AMP's scaler at the gradients, so an
fp16 gradient overflow is still skipped by the scaler. Shown with the demo's model under
CPU autocast in float16 and MMEngine's ``AmpOptimWrapper`` update path (backward through
the scaled loss, unscale, clip, scaler step and update) with a CPU ``GradScaler``. Two
things differ from a GPU run, both because of this machine:

- MMEngine's ``AmpOptimWrapper.__init__`` refuses a machine without an accelerator, and
  its ``optim_context`` refuses float16 on the CPU: the wrapper is set up here as
  ``CPUAmpOptimWrapper`` sets itself up, and the forward runs under ``torch.autocast``;
- the op's CPU kernel has no float16 (float32, float64 and bfloat16 only), so the
  attention sampling runs through the op's pure-PyTorch reference, in float16 too.
"""
import copy
import sys
from types import SimpleNamespace

import pytest
import torch
from mmdet.structures import DetDataSample
from mmengine.logging import MessageHub
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmengine.structures import InstanceData

import projects.deformable_detr.models.utils.non_finite as non_finite
from projects.deformable_detr.engine.hooks import SkipNonFiniteHook
from projects.deformable_detr.models.utils.non_finite import (NonFiniteError, check_losses,
                                                              first_non_finite)

pytestmark = pytest.mark.usefixtures('one_thread')

# Every way a tensor's value reaches Python, i.e. a host synchronisation on a GPU.
HOST_READS = ('item', 'tolist', 'cpu', 'numpy', '__bool__', '__float__', '__int__',
              '__index__')


@pytest.fixture(scope='module')
def model(build_demo_model):
    return build_demo_model().train()


def batch(nan: bool = False):
    """Two random 64x64 / 64x48 images (one NaN pixel in the second if ``nan``)."""
    gen = torch.Generator().manual_seed(0)
    inputs = torch.zeros(2, 3, 64, 64)
    samples = []
    for i, (h, w) in enumerate([(64, 64), (64, 48)]):
        inputs[i, :, :h, :w] = torch.randn(3, h, w, generator=gen)
        sample = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w),
                                             scale_factor=(1.0, 1.0),
                                             batch_input_shape=(64, 64)))
        sample.gt_instances = InstanceData(
            bboxes=torch.tensor([[0.1 * w, 0.2 * h, 0.6 * w, 0.9 * h]]),
            labels=torch.tensor([1]))
        samples.append(sample)
    if nan:
        inputs[1, 0, 10, 10] = float('nan')
    return inputs, samples


@pytest.fixture
def host_reads(monkeypatch):
    """Counts, by method, the host reads of tensors from now on."""
    calls = {}
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


def test_check_reads_the_host_once_per_step(model, host_reads):
    inputs, samples = batch()
    losses = model.loss(inputs, copy.deepcopy(samples))
    assert len(losses) == 12
    host_reads.clear()
    check_losses(losses, model, inputs, samples)
    assert host_reads == {'tolist': 1}  # all 12 terms, their sum and the agreed flag


def fake_all_reduce(other_failed: bool):
    """An all-reduce (max) with one more process, whose losses are (not) finite."""
    calls = []

    def all_reduce(tensor, op):
        calls.append(op)
        if other_failed:
            tensor.fill_(1.0)
    return all_reduce, calls


def test_another_process_failing_stops_this_one(monkeypatch, model):
    all_reduce, calls = fake_all_reduce(other_failed=True)
    monkeypatch.setattr(non_finite, 'all_reduce', all_reduce)
    # Rank 0 (this one) is finite; rank 1 sends its cause.
    monkeypatch.setattr(non_finite, 'all_gather_object', lambda cause: [cause, 'X'])
    with pytest.raises(NonFiniteError, match=r': another process met non-finite losses '
                       r'\| rank 1: X$'):
        check_losses(dict(loss_a=torch.tensor(1.0)), model, *batch())
    assert calls == ['max']
    all_reduce, calls = fake_all_reduce(other_failed=False)
    monkeypatch.setattr(non_finite, 'all_reduce', all_reduce)
    check_losses(dict(loss_a=torch.tensor(1.0)), model, *batch())
    assert calls == ['max']  # every step takes part, finite or not


def test_every_process_raises_every_cause(monkeypatch, model):
    """Ranks 0 and 2 of three fail: each names both, whichever the launcher hears first."""
    all_reduce, _ = fake_all_reduce(other_failed=True)
    monkeypatch.setattr(non_finite, 'all_reduce', all_reduce)
    monkeypatch.setattr(non_finite, 'first_non_finite', lambda *args: 'X')
    sent = []

    def all_gather_object(cause):
        sent.append(cause)
        return [cause, None, 'Y']
    monkeypatch.setattr(non_finite, 'all_gather_object', all_gather_object)
    # (the step's name comes first: 'a training step', or the iteration that MessageHub
    # holds from an earlier test)
    with pytest.raises(NonFiniteError, match=r'^[^:]+: rank 0: non-finite loss terms '
                       r'loss_a=nan; the first non-finite tensor: X \| rank 2: Y$'):
        check_losses(dict(loss_a=torch.tensor(float('nan'))), model, *batch())
    assert sent == ['non-finite loss terms loss_a=nan; the first non-finite tensor: X']


def test_only_the_non_finite_terms_are_named(monkeypatch, model):
    monkeypatch.setattr(non_finite, 'first_non_finite', lambda *args: 'X')
    losses = dict(loss_a=torch.tensor(1.0), loss_b=torch.tensor(float('inf')),
                  loss_c=[torch.tensor(2.0), torch.tensor([float('nan'), 1.0])])
    with pytest.raises(NonFiniteError, match=r': non-finite loss terms '
                       r'loss_b=inf, loss_c=nan; the first non-finite tensor: X$'):
        check_losses(losses, model, *batch())
    # Finite terms whose sum (the loss that backward gets) is not.
    with pytest.raises(NonFiniteError, match='the sum of the finite loss terms overflows to inf'):
        check_losses(dict(loss_a=torch.tensor(3e38), loss_b=torch.tensor(3e38)), model,
                     *batch())


def test_diagnosis_leaves_buffers_and_rng_alone(model):
    bad = copy.deepcopy(model)
    bad.neck.convs[1].register_forward_hook(lambda m, args, out: out * float('inf'))
    inputs, samples = batch()
    buffers = [b.clone() for b in bad.buffers()]
    rng = torch.get_rng_state()
    assert first_non_finite(bad, inputs, samples).startswith('the output of neck.convs.1 ')
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, b) for a, b in zip(bad.buffers(), buffers))


@pytest.fixture
def fp16_amp(monkeypatch, model):
    """A copy of the model, and MMEngine's AmpOptimWrapper with a CPU GradScaler whose
    first scale (2^40) overflows float16 in any backward pass; it backs off by 2^-16."""
    op_module = sys.modules['ops.multi_scale_deformable_attn']
    monkeypatch.setattr(op_module, 'has_kernel', lambda device_type: False)
    model = copy.deepcopy(model)
    wrapper = AmpOptimWrapper.__new__(AmpOptimWrapper)
    OptimWrapper.__init__(wrapper, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4),
                          clip_grad=dict(max_norm=1.0))
    wrapper.loss_scaler = torch.amp.GradScaler('cpu', init_scale=2.0**40,
                                               backoff_factor=2.0**-16)
    wrapper._scale_update_param = None
    wrapper.cast_dtype = torch.float16
    return model, wrapper


def amp_step(model, wrapper, nan=False):
    """One training step as MMEngine runs it, under float16 autocast; returns the dtypes
    that the Linear layers computed in."""
    inputs, samples = batch(nan)
    dtypes = set()
    handles = [m.register_forward_hook(lambda m, args, out: dtypes.add(out.dtype))
               for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.autocast('cpu', dtype=wrapper.cast_dtype):
            losses = model.loss(inputs, copy.deepcopy(samples))
    finally:
        for handle in handles:
            handle.remove()
    loss, _ = model.parse_losses(losses)
    wrapper.update_params(loss)
    return dtypes


def test_fp16_overflow_is_skipped_by_the_scaler(fp16_amp):
    model, wrapper = fp16_amp
    params = [p.detach().clone() for p in model.parameters()]
    # The losses are finite, so our check lets the step through; the scaled backward
    # overflows float16, so the scaler skips the update and lowers its scale.
    assert amp_step(model, wrapper) == {torch.float16}
    assert wrapper.loss_scaler.get_scale() == 2.0**24
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert not wrapper.optimizer.state  # AdamW never stepped
    # Training goes on: at a lower scale a step is taken, and everything is finite.
    for _ in range(3):
        amp_step(model, wrapper)
        if wrapper.optimizer.state:
            break
    assert wrapper.optimizer.state, f'no step taken down to scale {wrapper.loss_scaler.get_scale()}'
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fp16_non_finite_loss_stops_before_the_scaler(fp16_amp):
    model, wrapper = fp16_amp
    params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteError, match=r'non-finite loss terms loss_cls=nan.*the input '
                       r'images: NaN in 1 of .* in images \[1\]'):
        amp_step(model, wrapper, nan=True)
    assert wrapper.loss_scaler.get_scale() == 2.0**40  # never reached the scaler
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))


class FailingModel(torch.nn.Module):
    """A BatchNorm whose forward pass (running statistics updated) then fails."""

    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(3)

    def train_step(self, data, optim_wrapper):
        self.bn(data)
        raise NonFiniteError('iteration 7: non-finite loss terms loss_cls=nan')


def test_skip_hook_undoes_the_step_and_stops_past_max_skips():
    model = FailingModel().train()
    model.bn.weight.grad = torch.ones(3)  # accumulated by an earlier step: kept
    runner = SimpleNamespace(model=model, message_hub=MessageHub.get_instance('skip_test'))
    hook = SkipNonFiniteHook(max_skips=2)
    hook.before_train(runner)
    buffers = [b.clone() for b in model.buffers()]
    for count in (1, 2):
        assert model.train_step(torch.randn(4, 3), optim_wrapper=None) == {}
        assert all(torch.equal(a, b) for a, b in zip(model.buffers(), buffers))
        assert runner.message_hub.get_scalar('train/non_finite_skips').current() == count
    with pytest.raises(NonFiniteError, match=r'iteration 7: .* \(and 2 steps were skipped '
                       r'before: max_skips\)'):
        model.train_step(torch.randn(4, 3), optim_wrapper=None)
    assert torch.equal(model.bn.weight.grad, torch.ones(3))
