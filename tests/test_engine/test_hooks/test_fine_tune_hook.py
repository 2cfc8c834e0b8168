"""Fine-tuning load: a checkpoint of other classes loads but for its class branches; and
tools/test.py's load (CheckpointFitHook): a checkpoint that does not fit is an error."""
import logging
import types

import pytest
import torch
from mmdet.registry import MODELS
from mmengine.logging import MMLogger
from mmengine.registry import init_default_scope

from projects.deformable_detr.checkpoint.class_branches import (CheckpointMismatchError,
                                                               fit_class_branches)
from projects.deformable_detr.engine.hooks import CheckpointFitHook, FineTuneHook

pytestmark = pytest.mark.usefixtures('one_thread')


def build(small_model_cfg, variant, num_classes, seed, perturb=True, init=True):
    """An initialised model of ``variant``; perturbed, it stands for a trained one."""
    init_default_scope('mmdet')
    cfg = small_model_cfg(variant)
    cfg.bbox_head.num_classes = num_classes
    torch.manual_seed(seed)
    model = MODELS.build(cfg)
    if init:
        model.init_weights()
    if perturb:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


class Records(logging.Handler):
    """The messages MMEngine's current logger emits while installed."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        MMLogger.get_current_instance().addHandler(self)
        return self

    def __exit__(self, *exc):
        MMLogger.get_current_instance().removeHandler(self)


def runner(model, resume=False):
    """What the hook reads of MMEngine's Runner."""
    return types.SimpleNamespace(model=model, _resume=resume)


@pytest.mark.parametrize('variant', ['twostage', 'refine', 'plain'])
def test_everything_but_the_class_branches_is_loaded(variant, small_model_cfg):
    source = build(small_model_cfg, variant, num_classes=5, seed=0)
    checkpoint = dict(state_dict=source.state_dict(),
                      meta=dict(dataset_meta=dict(classes=('a', 'b', 'c', 'd', 'e'))))
    model = build(small_model_cfg, variant, num_classes=3, seed=1, perturb=False)
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    with Records() as records:
        FineTuneHook().after_load_checkpoint(runner(model), checkpoint)
    model.load_state_dict(checkpoint['state_dict'], strict=True)  # as the Runner then does

    layers = model.decoder.num_layers
    proposal = layers if variant == 'twostage' else None
    class_keys = [f'bbox_head.cls_branches.{i}.{p}'
                  for i in range(layers + (variant == 'twostage')) for p in ('weight', 'bias')]
    loaded, theirs = model.state_dict(), source.state_dict()
    for key, value in loaded.items():
        if key not in class_keys:
            assert torch.equal(value, theirs[key]), key
        elif key.startswith(f'bbox_head.cls_branches.{proposal}.'):
            # the proposal score (row 0) and as many rows as fit: the checkpoint's
            assert torch.equal(value, theirs[key][:3]), key
        else:
            assert torch.equal(value, initial[key]), key
            assert not torch.equal(value, theirs[key][:3]), key
    # The log names every skipped tensor with both shapes, and the old classes.
    log = '\n'.join(records.messages)
    assert (f'FineTuneHook: from 5 classes (a, b, c, d, e): {len(class_keys)} class-branch '
            'tensors of the checkpoint have another class count' in log)
    for key in class_keys:
        shapes = ('checkpoint (5, 256), model (3, 256)' if key.endswith('weight') else
                  'checkpoint (5), model (3)')
        assert f'{key}: {shapes}: ' in log, key
    assert log.count('not loaded, initialised') == len(class_keys) - 2 * (proposal is not None)
    if proposal is not None:
        assert log.count('proposal classifier: rows 0-2 loaded') == 2


def test_more_classes_than_the_checkpoint(small_model_cfg):
    source = build(small_model_cfg, 'twostage', num_classes=2, seed=0)
    model = build(small_model_cfg, 'twostage', num_classes=4, seed=1, perturb=False)
    initial = model.state_dict()['bbox_head.cls_branches.2.weight'].clone()
    state = source.state_dict()
    lines = fit_class_branches(model, state)
    assert 'rows 0-1 loaded (row 0 is the class-agnostic proposal score), rows 2-3 ' \
           'initialised' in '\n'.join(lines)
    fitted = state['bbox_head.cls_branches.2.weight']
    assert torch.equal(fitted[:2], source.state_dict()['bbox_head.cls_branches.2.weight'])
    assert torch.equal(fitted[2:], initial[2:])


def test_same_classes_load_everything(small_model_cfg):
    source = build(small_model_cfg, 'twostage', num_classes=3, seed=0)
    model = build(small_model_cfg, 'twostage', num_classes=3, seed=1, perturb=False)
    state = source.state_dict()
    assert fit_class_branches(model, state) == []
    model.load_state_dict(state, strict=True)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_other_mismatches_are_errors_that_list_the_keys(small_model_cfg):
    model = build(small_model_cfg, 'twostage', num_classes=3, seed=1, perturb=False)
    hook = FineTuneHook()
    # A checkpoint of another variant: missing and unexpected keys.
    refine = build(small_model_cfg, 'refine', num_classes=3, seed=0).state_dict()
    with pytest.raises(CheckpointMismatchError) as err:
        hook.after_load_checkpoint(runner(model), dict(state_dict=refine))
    msg = str(err.value)
    assert 'memory_trans_fc.weight' in msg and 'pos_trans_norm.bias' in msg  # missing
    assert 'query_embedding.weight' in msg and 'reference_points_fc.bias' in msg  # unexpected
    assert 'keys of the model missing from the checkpoint' in msg
    assert 'keys of the checkpoint the model does not have' in msg
    # A tensor of another shape outside the class branches, or a class branch whose
    # width (not its class count) differs: listed with both shapes.
    state = build(small_model_cfg, 'twostage', num_classes=5, seed=0).state_dict()
    state['bbox_head.reg_branches.1.4.weight'] = torch.zeros(4, 128)
    state['bbox_head.cls_branches.0.weight'] = torch.zeros(5, 128)
    with pytest.raises(CheckpointMismatchError) as err:
        hook.after_load_checkpoint(runner(model), dict(state_dict=state))
    msg = str(err.value)
    assert '2 tensors of the checkpoint with other shapes' in msg
    assert 'bbox_head.reg_branches.1.4.weight: checkpoint (4, 128), model (4, 256)' in msg
    assert 'bbox_head.cls_branches.0.weight: checkpoint (5, 128), model (3, 256)' in msg
    # mmdet's own checkpoints lack the neck conv biases: the error says what to do.
    mmdet_like = {k: v for k, v in model.state_dict().items()
                  if not (k.startswith('neck.') and k.endswith('conv.bias'))}
    with pytest.raises(CheckpointMismatchError, match='mmdet_to_ours.py'):
        hook.after_load_checkpoint(runner(model), dict(state_dict=mmdet_like))
    with pytest.raises(CheckpointMismatchError, match='official_to_ours.py'):
        hook.after_load_checkpoint(runner(model), dict(model=model.state_dict()))


def test_resume_and_uninitialised_models_take_no_other_classes(small_model_cfg):
    state = build(small_model_cfg, 'twostage', num_classes=5, seed=0).state_dict()
    model = build(small_model_cfg, 'twostage', num_classes=3, seed=1, perturb=False)
    with pytest.raises(CheckpointMismatchError, match='resuming') as err:
        FineTuneHook().after_load_checkpoint(runner(model, resume=True),
                                             dict(state_dict=dict(state)))
    assert 'bbox_head.cls_branches.0.weight: checkpoint (5, 256), model (3, 256)' in str(err.value)
    uninitialised = build(small_model_cfg, 'twostage', num_classes=3, seed=1,
                          perturb=False, init=False)
    assert not uninitialised.is_init  # test.py and val never initialise the model
    with pytest.raises(CheckpointMismatchError, match='not initialised'):
        FineTuneHook().after_load_checkpoint(runner(uninitialised),
                                             dict(state_dict=dict(state)))
    # DDP's module. prefix is read as MMEngine reads it
    prefixed = {'module.' + k: v for k, v in state.items()}
    lines = fit_class_branches(model, prefixed)
    assert len(lines) == 2 * (model.decoder.num_layers + 1)
    assert prefixed['module.bbox_head.cls_branches.0.weight'].shape == (3, 256)


# --- CheckpointFitHook (tools/test.py) ----------------------------------------------

def test_fit_hook_passes_a_fitting_checkpoint_untouched(small_model_cfg):
    model = build(small_model_cfg, 'twostage', num_classes=5, seed=0, init=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    CheckpointFitHook().after_load_checkpoint(runner(model), dict(state_dict=state))
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_fit_hook_lists_every_difference(small_model_cfg):
    model = build(small_model_cfg, 'twostage', num_classes=5, seed=0, init=False)
    hook = CheckpointFitHook()
    # another FFN width (what --cfg-options at training gives), and other classes
    wider = build(small_model_cfg, 'twostage', num_classes=7, seed=0, init=False)
    state = dict(model.state_dict())
    ffn = next(k for k in state if k.endswith('ffn.layers.0.0.weight'))
    state[ffn] = torch.zeros(state[ffn].shape[0] * 2, state[ffn].shape[1])
    cls = 'bbox_head.cls_branches.0.weight'
    state[cls] = wider.state_dict()[cls]
    state['extra.weight'] = torch.zeros(1)
    del state['level_embed']
    with pytest.raises(CheckpointMismatchError) as err:
        hook.after_load_checkpoint(runner(model), dict(state_dict=state))
    message = str(err.value)
    assert message.startswith('the checkpoint does not fit the model:')
    assert 'level_embed' in message and 'extra.weight' in message
    assert f'{ffn}: checkpoint ({2 * model.state_dict()[ffn].shape[0]}, ' in message
    assert 'bbox_head.cls_branches.0.weight: checkpoint (7, ' in message


def test_fit_hook_loads_an_mmdet_checkpoint_with_a_warning(small_model_cfg):
    """mmdet's model has no neck conv biases: ours keep their zeros."""
    model = build(small_model_cfg, 'twostage', num_classes=5, seed=0, perturb=False,
                  init=False)
    biases = [k for k in model.state_dict() if k.startswith('neck.') and
              k.endswith('conv.bias')]
    assert biases and all(not model.state_dict()[k].any() for k in biases)
    mmdet_like = {k: v for k, v in model.state_dict().items() if k not in biases}
    with Records() as records:
        CheckpointFitHook().after_load_checkpoint(runner(model), dict(state_dict=mmdet_like))
    warning, = [m for m in records.messages if 'neck conv biases' in m]
    assert all(f'{k}: not in the checkpoint' in warning for k in biases)
    # another missing key is still an error
    del mmdet_like['level_embed']
    with pytest.raises(CheckpointMismatchError, match='level_embed'):
        CheckpointFitHook().after_load_checkpoint(runner(model), dict(state_dict=mmdet_like))


def test_fit_hook_sends_official_checkpoints_to_the_converter(small_model_cfg):
    model = build(small_model_cfg, 'plain', num_classes=5, seed=0, init=False)
    with pytest.raises(CheckpointMismatchError, match='official_to_ours.py'):
        CheckpointFitHook().after_load_checkpoint(runner(model), dict(model={}))
