# + iterative bounding box refinement: each decoder layer refines the boxes of
# the previous one, with its own head branch. Paper: 46.2 AP.
_base_ = './deformable-detr_r50_16xb2-50e_coco.py'
model = dict(with_box_refine=True)
