"""Our modules live in the `ddetr` scope beside mmdet's same-named ones."""

import pytest
from mmdet.models.detectors import DeformableDETR as MMDetDeformableDETR
from mmdet.models.task_modules import HungarianAssigner as MMDetHungarianAssigner
from mmdet.registry import MODELS as MMDET_MODELS
from mmdet.registry import TASK_UTILS as MMDET_TASK_UTILS
from mmengine.registry import init_default_scope

from projects.deformable_detr import (MODELS, TASK_UTILS, DeformableDETR, DeformableDETRHead,
                                      HungarianAssigner)

pytestmark = pytest.mark.usefixtures('one_thread')


def test_both_deformable_detrs_build_in_one_process(small_model_cfg):
    init_default_scope('mmdet')
    ours = MMDET_MODELS.build(small_model_cfg('plain', ours=True))
    theirs = MMDET_MODELS.build(small_model_cfg('plain', ours=False))
    assert type(ours) is DeformableDETR and type(theirs) is MMDetDeformableDETR
    assert type(ours.bbox_head) is DeformableDETRHead
    assert type(ours.bbox_head.criterion.assigner) is HungarianAssigner
    assert type(theirs.bbox_head.assigner) is MMDetHungarianAssigner


def test_lookup_by_scope():
    assert MMDET_MODELS.get('ddetr.DeformableDETR') is DeformableDETR
    assert MMDET_MODELS.get('DeformableDETR') is MMDetDeformableDETR
    assert MMDET_TASK_UTILS.get('ddetr.HungarianAssigner') is HungarianAssigner


def test_our_registry_prefers_ours_whatever_the_default_scope():
    init_default_scope('mmdet')
    # MMEngine's build would switch to mmdet's registry (the default scope) here.
    assert type(TASK_UTILS.build(dict(type='HungarianAssigner'))) is HungarianAssigner
    assert type(TASK_UTILS.build(dict(type='mmdet.HungarianAssigner', match_costs=[
        dict(type='FocalLossCost')]))) is MMDetHungarianAssigner
    # mmdet's classes are found through the parent registry.
    assert type(MODELS.build(dict(type='L1Loss'))).__module__.startswith('mmdet.')
    head = MODELS.build(dict(type='DeformableDETRHead', num_classes=3,
                             train_cfg=dict(assigner=dict(type='HungarianAssigner'))))
    assert type(head.criterion.assigner) is HungarianAssigner
