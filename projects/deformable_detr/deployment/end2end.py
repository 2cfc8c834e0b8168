"""The detector as one end-to-end graph: normalised images in, top-k detections out.

:class:`End2EndDetector` runs a :class:`~..models.detectors.DeformableDETR` from a
normalised image batch to its top-k detections, top-k included (as mmdeploy's end-to-end
detectors do), so that a runtime needs no Python around it. It runs the detector's own
stages (``extract_feat``, ``embed_levels``, ``encode_decode``) and the head's top-k rule;
only the padding masks come from a tensor of image sizes, an input of the graph.
"""
from typing import Sequence, Tuple, Union

import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from torch import Tensor, nn

from ..models.dense_heads.deformable_detr_head import select_top_k
from ..models.detectors.deformable_detr import DeformableDETR
from ..models.layers.deformable_transformer import padding_masks


class ExportError(RuntimeError):
    """A model, or a piece of it, that cannot be exported; the message names the piece."""


def top_detections(cls_logits: Tensor, boxes: Tensor, img_shapes: Tensor,
                   max_per_img: int) -> Tuple[Tensor, Tensor]:
    """The head's prediction (:func:`~..models.dense_heads.deformable_detr_head.select_top_k`),
    batched, with boxes in pixels of sizes given as a tensor.

    Args:
        cls_logits: (bs, nq, num_classes) of the last decoder layer.
        boxes: (bs, nq, 4) normalised (cx, cy, w, h).
        img_shapes: (bs, 2) (h, w) of every image, the frame of the boxes.
        max_per_img: Detections kept per image (fewer when there are fewer
            (query, class) pairs).

    Returns:
        dets (bs, k, 5): (x1, y1, x2, y2) in pixels of the input image, clipped to the
        image, and the score; labels (bs, k) int64. Sorted by score.
    """
    scores, labels, boxes = select_top_k(cls_logits, boxes, max_per_img)
    centre, size = boxes[..., :2], boxes[..., 2:]
    wh = img_shapes.flip(-1).to(boxes.dtype)[:, None]  # (bs, 1, 2): (w, h)
    corners = torch.cat([(centre - size / 2) * wh, (centre + size / 2) * wh], -1)
    corners = torch.minimum(corners.clamp(min=0), wh.repeat(1, 1, 2))
    return torch.cat([corners, scores[..., None]], -1), labels


class End2EndDetector(nn.Module):
    """A :class:`~..models.detectors.DeformableDETR` from normalised images to its top-k detections.

    Inputs: ``input`` (bs, 3, H, W), images as the data preprocessor makes them
    (colour order, mean and std applied, zero-padded at the bottom and right to one
    size), and ``img_shapes`` (bs, 2) int64, the (h, w) of every image in it. Outputs:
    ``dets`` (bs, k, 5), (x1, y1, x2, y2) in pixels of the input image and the score,
    and ``labels`` (bs, k) int64; k is the config's ``test_cfg.max_per_img`` (100).
    These are the detections of ``detector.predict(..., rescale=False)``.

    Padding is masked as in training and testing (the masks are computed in the graph
    from ``img_shapes``), so a batch of images of several sizes gives what
    ``detector.predict`` gives for that batch.

    Args:
        detector: The detector, in eval mode.
    """

    def __init__(self, detector: DeformableDETR) -> None:
        super().__init__()
        self.detector = detector
        self.max_per_img = detector.bbox_head.test_cfg['max_per_img']

    def forward(self, images: Tensor, img_shapes: Tensor) -> Tuple[Tensor, Tensor]:
        detector = self.detector
        feats = detector.extract_feat(images)
        masks = padding_masks(img_shapes, images.shape[-2:], [f.shape[-2:] for f in feats])
        outs = detector.encode_decode(detector.embed_levels(feats, masks))
        hidden_states, references = outs['hidden_states'], outs['references']
        last = len(hidden_states) - 1
        cls_logits, boxes = detector.bbox_head.forward_layer(last, hidden_states[last],
                                                             references[last])
        return top_detections(cls_logits, boxes, img_shapes, self.max_per_img)


def example_inputs(shape: Sequence[int], batch: int = 1, seed: int = 0
                   ) -> Tuple[Tensor, Tensor]:
    """Random normalised images (batch, 3, H, W) and their (full) sizes, to trace with."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, *shape, generator=gen)
    return images, torch.tensor([list(shape)] * batch, dtype=torch.long)


def build_detector(config: Union[str, Config]) -> DeformableDETR:
    """The config's model, built as the tools build it, in eval mode.

    Raises:
        ExportError: the model is not this project's ``ddetr.DeformableDETR`` (mmdet's
            own Deformable DETR, for instance, has no export path here).
    """
    cfg = Config.fromfile(config) if isinstance(config, str) else config
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    from mmdet.registry import MODELS
    model = MODELS.build(cfg.model)
    if not isinstance(model, DeformableDETR):
        raise ExportError(
            f'model (type={cfg.model.get("type")!r}, {type(model).__module__}.'
            f'{type(model).__name__}) cannot be exported: the deployment path is that of '
            "this project's detector, type='ddetr.DeformableDETR'")
    return model.eval()
