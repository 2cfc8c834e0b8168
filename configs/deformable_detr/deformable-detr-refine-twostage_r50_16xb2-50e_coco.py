# ++ two-stage: the encoder scores every pixel as a proposal and the top 300
# become the decoder's initial reference boxes. Paper: 46.9 AP.
_base_ = './deformable-detr-refine_r50_16xb2-50e_coco.py'
model = dict(as_two_stage=True)
