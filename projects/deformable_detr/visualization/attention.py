"""Where the deformable attention looks: sampling points captured, mapped, drawn.

The paper's figures show, for a detected object, the sampling points of the last decoder
layer on every level, each weighted by its attention weight, and for an encoder pixel
the points it samples. This module produces them for any of the variants:

1. **Capture.** :func:`record_sampling` registers a sampling hook (the attention layer's
   public ``register_sampling_hook``) on the chosen attention layers; one forward of the
   model records the locations and weights that the op receives, and the layer's
   reference points.
2. **Mapping.** The op's (x, y) locations are normalised to each level's *padded* map
   (the whole batch); the model puts an image's reference ``r`` (normalised to the
   image's valid, unpadded part) at ``r * valid_ratio`` of every level. So a location
   ``l`` on level ``k`` maps back to ``l / valid_ratio[k]`` of the valid image, times
   the resized image's size (``img_shape``), divided by the pipeline's ``scale_factor``:
   pixels of the original image (:func:`level_to_pixels`). The valid ratios are those
   the model computes, from the same padding masks (:func:`valid_ratios`).
3. **Drawing and JSON.** :func:`draw_attention` draws one PNG per image, a panel per
   chosen query; :func:`visualize_attention` runs everything and writes the JSON.
"""
import contextlib
import json
import os
import os.path as osp
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ..models.layers.deformable_transformer import padding_masks, valid_ratio
from ..models.layers.multi_scale_deformable_attention import MultiScaleDeformableAttention

# ----------------------------------------------------------------------------------
# Capture
# ----------------------------------------------------------------------------------


def attention_layer(model: nn.Module, stack: str, layer: int) -> MultiScaleDeformableAttention:
    """The deformable attention of ``model``'s ``stack`` ('encoder' or 'decoder') layer.

    ``layer`` counts from 0, or from the end when negative, as Python indices do.

    Raises:
        ValueError: no such layer (the message gives the stack's layer count).
    """
    layers = getattr(model, stack).layers
    if not -len(layers) <= layer < len(layers):
        raise ValueError(f'layer {layer} does not exist: the {stack} has {len(layers)} '
                         f'layers (0 to {len(layers) - 1}, or -{len(layers)} to -1 counting '
                         'from the last)')
    block = layers[layer]
    return block.cross_attn if stack == 'decoder' else block.self_attn


@contextlib.contextmanager
def record_sampling(layers: Dict[str, MultiScaleDeformableAttention]
                    ) -> Iterator[Dict[str, Dict[str, Tensor]]]:
    """Records what the op receives in each of ``layers`` while the context is open.

    Yields a dict that a forward fills: per name of ``layers``, the last call's
    ``reference_points`` (bs, nq, levels, 2|4), ``spatial_shapes`` (levels, 2),
    ``sampling_locations`` (bs, nq, heads, levels, points, 2) and ``attention_weights``
    (bs, nq, heads, levels, points), detached, on the CPU.
    """
    records: Dict[str, Dict[str, Tensor]] = {}

    def hook(name, _module, reference_points, spatial_shapes, locations, weights):
        records[name] = dict(reference_points=reference_points, spatial_shapes=spatial_shapes,
                             sampling_locations=locations, attention_weights=weights)
        records[name] = {k: v.detach().cpu() for k, v in records[name].items()}

    handles = [layer.register_sampling_hook(
        lambda *args, name=name: hook(name, *args)) for name, layer in layers.items()]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


# ----------------------------------------------------------------------------------
# Mapping between the op's frame and the original image
# ----------------------------------------------------------------------------------


def valid_ratios(metainfos: Sequence[dict], level_shapes: Sequence[Tuple[int, int]]) -> Tensor:
    """(bs, levels, 2) valid (w, h) fraction of every level, as the model computes it.

    Built from the same padding masks as the model's (the batch's ``img_shape`` and
    ``batch_input_shape``), so rounding on coarse levels is the model's rounding.
    """
    img_shapes = torch.tensor([m['img_shape'][:2] for m in metainfos])
    masks = padding_masks(img_shapes, metainfos[0]['batch_input_shape'], level_shapes)
    return torch.stack([valid_ratio(m) for m in masks], 1)


def level_to_pixels(xy: Tensor, ratios: Tensor, img_shape: Sequence[int],
                    scale_factor: Sequence[float]) -> Tensor:
    """(..., 2) level-frame (x, y), as the op receives them, in original-image pixels.

    Args:
        xy: Normalised to a level's padded map.
        ratios: That level's valid (w, h) ratio, broadcastable to ``xy``.
        img_shape: (h, w) of the image after the pipeline's resize, before padding.
        scale_factor: The pipeline's (w, h) resize factor.
    """
    size = xy.new_tensor([img_shape[1], img_shape[0]])
    return xy / ratios * size / xy.new_tensor(scale_factor[:2])


def pixel_to_encoder_query(pixel: Sequence[float], level: int,
                           level_shapes: Sequence[Tuple[int, int]], ratios: Tensor,
                           img_shape: Sequence[int], scale_factor: Sequence[float]) -> int:
    """Index, among the encoder's queries, of the ``level`` cell holding ``pixel``.

    ``pixel`` is (x, y) in the original image; ``ratios`` (levels, 2) the image's valid
    ratios. The encoder's query (i, j) of a level covers the valid part's cells:
    its reference is the centre of cell (i, j) of the ``ratio * (w, h)`` valid cells.
    """
    h, w = level_shapes[level]
    valid_w = max(1, round(float(ratios[level, 0]) * w))
    valid_h = max(1, round(float(ratios[level, 1]) * h))
    u = pixel[0] * scale_factor[0] / img_shape[1]  # normalised to the valid image
    v = pixel[1] * scale_factor[1] / img_shape[0]
    col = min(int(u * valid_w), valid_w - 1)
    row = min(int(v * valid_h), valid_h - 1)
    start = sum(lh * lw for lh, lw in level_shapes[:level])
    return start + row * w + col


def _reference_in_pixels(reference: Tensor, ratios: Tensor, img_shape, scale_factor
                         ) -> Dict[str, List[float]]:
    """A layer's reference on level 0 (levels, 2|4), back in original pixels.

    Every level holds the same reference, scaled by its valid ratio; level 0's is taken.
    """
    centre = level_to_pixels(reference[0, :2], ratios[0], img_shape, scale_factor)
    if reference.shape[-1] == 2:
        return dict(point=centre.tolist())
    size = level_to_pixels(reference[0, 2:], ratios[0], img_shape, scale_factor)
    return dict(point=centre.tolist(), box=torch.cat([centre - size / 2,
                                                      centre + size / 2]).tolist())


def _sampling_entry(record: Dict[str, Tensor], image: int, query: int, ratios: Tensor,
                    img_shape, scale_factor) -> Dict[str, Any]:
    """One query's reference and sampling points, in the op's frame and in pixels."""
    locations = record['sampling_locations'][image, query]  # (heads, levels, points, 2)
    weights = record['attention_weights'][image, query]
    pixels = level_to_pixels(locations, ratios[None, :, None, :], img_shape, scale_factor)
    return dict(
        reference=_reference_in_pixels(record['reference_points'][image, query], ratios,
                                       img_shape, scale_factor),
        sampling_locations=locations.tolist(), sampling_pixels=pixels.tolist(),
        attention_weights=weights.tolist())


# ----------------------------------------------------------------------------------
# Running the model
# ----------------------------------------------------------------------------------


def _check_selection(model: nn.Module, layer: int, queries: Optional[Sequence[int]],
                     top_k: Optional[int], pixels: Sequence[Sequence[float]],
                     pixel_level: int) -> None:
    """Refuses, before anything runs, what the model cannot answer."""
    if queries is not None and top_k is not None:
        raise ValueError('give queries or top_k, not both')
    if queries is not None or top_k is not None or not pixels:
        attention_layer(model, 'decoder', layer)
    if pixels:
        attention_layer(model, 'encoder', layer)
        if not 0 <= pixel_level < model.num_feature_levels:
            raise ValueError(f'pixel level {pixel_level} does not exist: the model has '
                             f'{model.num_feature_levels} feature levels (0 to '
                             f'{model.num_feature_levels - 1})')
    for p in pixels:
        if len(p) != 2:
            raise ValueError(f'pixel {tuple(p)} must be two numbers, x,y')
    num_queries = model.num_queries
    for q in queries or ():
        if not 0 <= q < num_queries:
            raise ValueError(f'query {q} is out of range: the model has {num_queries} '
                             f'queries (0 to {num_queries - 1})')
    if top_k is not None and not 1 <= top_k <= num_queries:
        raise ValueError(f'top_k {top_k} is out of range: the model has {num_queries} '
                         'queries')


def load_images(pipeline, paths: Sequence[str]) -> List[dict]:
    """Each image through the test pipeline; an image that fails to load is named."""
    items = []
    for i, path in enumerate(paths):
        if not osp.isfile(path):
            raise ValueError(f'image {path!r} is not a file')
        try:
            items.append(pipeline(dict(img_path=path, img_id=i)))
        except Exception as err:  # the pipeline's errors do not say which image
            raise ValueError(f'image {path!r} could not be loaded: {type(err).__name__}: '
                             f'{err}') from err
    return items


def capture_attention(model: nn.Module, items: List[dict], layer: int = -1,
                      queries: Optional[Sequence[int]] = None, top_k: Optional[int] = None,
                      pixels: Sequence[Sequence[float]] = (), pixel_level: int = 0,
                      score_thr: float = 0.3) -> List[Dict[str, Any]]:
    """One forward of a padded batch; per image, the chosen queries' sampling points.

    Args:
        model: A ``ddetr.DeformableDETR`` in eval mode.
        items: Outputs of the test pipeline (:func:`load_images`), one batch.
        layer: Decoder layer whose cross-attention is drawn for the object queries, and
            encoder layer for the pixels; negative counts from the last.
        queries: Object queries to draw, by index; or
        top_k: the ``top_k`` queries of highest score. Neither and no ``pixels``: 3.
        pixels: (x, y) positions in the original images: the encoder query of the
            ``pixel_level`` cell there is drawn.
        pixel_level: Feature level of the encoder queries of ``pixels``.
        score_thr: Queries at or above this score are listed (and drawn) as detections.

    Returns:
        Per image a dict, as :func:`visualize_attention` writes it to JSON.

    Raises:
        ValueError: a layer, query, level or pixel that does not exist, named.
    """
    if queries is None and top_k is None and not pixels:
        top_k = 3
    _check_selection(model, layer, queries, top_k, pixels, pixel_level)
    with_queries = queries is not None or top_k is not None
    for item in items:
        meta = item['data_samples'].metainfo
        h, w = meta['ori_shape'][:2]
        for x, y in pixels:
            if not (0 <= x < w and 0 <= y < h):
                raise ValueError(f'pixel {x:g},{y:g} is outside the image '
                                 f'{meta.get("img_path")!r} ({w}x{h}: x in [0, {w}), y in '
                                 f'[0, {h}))')

    layers = {}
    if with_queries:
        layers['decoder'] = attention_layer(model, 'decoder', layer)
    if pixels:
        layers['encoder'] = attention_layer(model, 'encoder', layer)
    with torch.no_grad(), record_sampling(layers) as records:
        data = model.data_preprocessor(
            dict(inputs=[i['inputs'] for i in items],
                 data_samples=[i['data_samples'] for i in items]), False)
        all_cls, all_boxes = model(**data, mode='tensor')
    scores, labels = all_cls[-1].sigmoid().max(-1)
    scores, labels, boxes = scores.cpu(), labels.cpu(), all_boxes[-1].cpu()
    metas = [s.metainfo for s in data['data_samples']]
    level_shapes = [tuple(s) for s in next(iter(records.values()))['spatial_shapes'].tolist()]
    ratios = valid_ratios(metas, level_shapes)
    classes = (getattr(model, 'dataset_meta', None) or {}).get('classes', ())
    num_layers = {'decoder': model.decoder.num_layers, 'encoder': model.encoder.num_layers}

    results = []
    for i, meta in enumerate(metas):
        img_shape, scale_factor = meta['img_shape'][:2], meta['scale_factor'][:2]

        def box_pixels(box: Tensor) -> List[float]:
            # as the head's predict: clamped to the resized image, then rescaled
            cx, cy, bw, bh = box.tolist()
            x1y1x2y2 = torch.tensor([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2])
            x1y1x2y2[0::2] = (x1y1x2y2[0::2] * img_shape[1]).clamp(0, img_shape[1])
            x1y1x2y2[1::2] = (x1y1x2y2[1::2] * img_shape[0]).clamp(0, img_shape[0])
            return (x1y1x2y2 / torch.tensor(scale_factor).repeat(2)).tolist()

        def detection(q: int) -> Dict[str, Any]:
            label = int(labels[i, q])
            return dict(query=q, score=float(scores[i, q]), label=label,
                        class_name=classes[label] if label < len(classes) else None,
                        box=box_pixels(boxes[i, q]))

        nq = scores.shape[1]
        result: Dict[str, Any] = dict(
            image=meta.get('img_path'), ori_shape=list(meta['ori_shape'][:2]),
            img_shape=list(img_shape), batch_input_shape=list(meta['batch_input_shape']),
            scale_factor=list(scale_factor),
            levels=[dict(shape=list(s), valid_ratio=ratios[i, k].tolist(),
                         stride=meta['batch_input_shape'][1] / s[1])
                    for k, s in enumerate(level_shapes)],
            detections=[detection(q) for q in scores[i].argsort(descending=True).tolist()
                        if scores[i, q] >= score_thr])
        if with_queries:
            chosen = (list(queries) if queries is not None else
                      scores[i].argsort(descending=True)[:top_k].tolist())
            for q in chosen:
                if q >= nq:  # two-stage takes fewer queries than encoder pixels
                    raise ValueError(f'query {q} is out of range: image '
                                     f'{meta.get("img_path")!r} has {nq} queries (0 to '
                                     f'{nq - 1})')
            result['decoder_layer'] = layer % num_layers['decoder']
            result['decoder_queries'] = [
                dict(detection(q), **_sampling_entry(records['decoder'], i, q, ratios[i],
                                                     img_shape, scale_factor))
                for q in chosen]
        if pixels:
            result['encoder_layer'] = layer % num_layers['encoder']
            result['encoder_queries'] = []
            for x, y in pixels:
                q = pixel_to_encoder_query((x, y), pixel_level, level_shapes, ratios[i],
                                           img_shape, scale_factor)
                result['encoder_queries'].append(dict(
                    pixel=[x, y], level=pixel_level, query=q,
                    **_sampling_entry(records['encoder'], i, q, ratios[i], img_shape,
                                      scale_factor)))
        results.append(result)
    return results


# ----------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------

LEVEL_COLOURS = ('#e6194b', '#3cb44b', '#4363d8', '#f58231', '#911eb4', '#42d4f4')
WEIGHT_AREA = 600.0  # marker area (pt^2) of a point of attention weight 1
LEGEND_WEIGHTS = (0.05, 0.2, 0.5)


def _marker(weight: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Marker areas (pt^2) and opacities for attention weights (the legend shows the
    scale)."""
    return np.maximum(WEIGHT_AREA * weight, 2.0), np.clip(0.45 + 1.1 * weight, 0.45, 1.0)


def _panel(ax, image: np.ndarray, result: Dict[str, Any], entry: Dict[str, Any],
           title: str) -> None:
    """One query: the image, the detections, its box, reference and sampling points."""
    from matplotlib.patches import Rectangle
    h, w = image.shape[:2]
    ax.imshow(image, extent=(0, w, h, 0), interpolation='nearest')
    for det in result['detections']:
        x1, y1, x2, y2 = det['box']
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec='white', lw=0.8,
                               alpha=0.7))
    if 'box' in entry and 'score' in entry:  # a decoder query's predicted box
        x1, y1, x2, y2 = entry['box']
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec='yellow', lw=2))
    # the reference below the points: a small box reference holds them all
    ref = entry['reference']
    if 'box' in ref:
        x1, y1, x2, y2 = ref['box']
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec='cyan', lw=1.5,
                               ls='--'))
    ax.scatter([ref['point'][0]], [ref['point'][1]], s=80, marker='X', c='white',
               edgecolors='black', linewidths=1.0)
    pixels = np.asarray(entry['sampling_pixels'])  # (heads, levels, points, 2)
    weights = np.asarray(entry['attention_weights'])
    levels = np.broadcast_to(np.arange(pixels.shape[1])[None, :, None], weights.shape)
    colours = np.array([_rgba(LEVEL_COLOURS[k % len(LEVEL_COLOURS)]) for k in levels.ravel()])
    area, colours[:, 3] = _marker(weights.ravel())
    order = np.argsort(weights.ravel(), kind='stable')  # the heaviest on top
    xy = pixels.reshape(-1, 2)[order]
    ax.scatter(xy[:, 0], xy[:, 1], s=area[order], c=colours[order], edgecolors='black',
               linewidths=0.3)
    outside = int(((pixels[..., 0] < 0) | (pixels[..., 0] >= w) | (pixels[..., 1] < 0)
                   | (pixels[..., 1] >= h)).sum())
    if outside:
        title += f'\n{outside} of {weights.size} points outside the image'
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _rgba(colour: str) -> Tuple[float, float, float, float]:
    """A colour as matplotlib's (r, g, b, a) floats."""
    from matplotlib.colors import to_rgba
    return to_rgba(colour)


def draw_attention(result: Dict[str, Any], image: np.ndarray, out_file: str,
                   max_cols: int = 3, panel_inches: float = 4.0) -> None:
    """Draws an image's chosen queries, one panel each, with a legend, to ``out_file``.

    Args:
        result: One image's dict of :func:`capture_attention`.
        image: The original image, (h, w, 3) RGB.
        out_file: PNG to write.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    panels = []
    for entry in result.get('decoder_queries', []):
        name = entry['class_name'] if entry['class_name'] is not None else entry['label']
        panels.append((entry, f'query {entry["query"]}: {name} {entry["score"]:.2f}\n'
                              f'decoder layer {result["decoder_layer"]}'))
    for entry in result.get('encoder_queries', []):
        x, y = entry['pixel']
        panels.append((entry, f'pixel ({x:g}, {y:g}): level {entry["level"]} query '
                              f'{entry["query"]}\nencoder layer {result["encoder_layer"]}'))
    cols = max(1, min(max_cols, len(panels)))
    rows = max(1, -(-len(panels) // cols))
    h, w = image.shape[:2]
    # inches: each panel's image and two-line title, the legend, the figure's title
    row_h, legend_h, title_h = panel_inches * h / w + 0.6, 0.8, 0.4
    fig = Figure(figsize=(panel_inches * cols, row_h * rows + legend_h + title_h))
    FigureCanvasAgg(fig)
    for k, (entry, title) in enumerate(panels):
        _panel(fig.add_subplot(rows, cols, k + 1), image, result, entry, title)

    handles = [Line2D([], [], ls='', marker='o', ms=7, color=LEVEL_COLOURS[k % len(
        LEVEL_COLOURS)], label=f'level {k} ({lv["shape"][0]}x{lv["shape"][1]}, stride '
               f'{lv["stride"]:.3g})') for k, lv in enumerate(result['levels'])]
    handles += [Line2D([], [], ls='', marker='o', color='grey', ms=float(np.sqrt(_marker(
        np.array([wt]))[0][0])), label=f'weight {wt:g}') for wt in LEGEND_WEIGHTS]
    handles.append(Line2D([], [], ls='', marker='X', ms=9, color='white', mec='black',
                          label='reference point'))
    if any('box' in e['reference'] for e, _ in panels):
        handles.append(Patch(fill=False, ec='cyan', ls='--', label='reference box'))
    if result.get('decoder_queries'):
        handles.append(Patch(fill=False, ec='yellow', lw=2, label="the query's box"))
    handles.append(Patch(fill=False, ec='grey', label='detections'))
    fig.legend(handles=handles, loc='lower center', ncol=min(len(handles), 4), fontsize=8,
               frameon=False)
    fig.suptitle(f'{osp.basename(result["image"])}: sampling points, coloured by level, '
                 'sized by attention weight', fontsize=10, y=1 - 0.1 / fig.get_figheight(),
                 va='top')
    height = fig.get_figheight()
    fig.tight_layout(rect=(0, legend_h / height, 1, 1 - title_h / height))
    fig.savefig(out_file, dpi=100)


# ----------------------------------------------------------------------------------
# Everything
# ----------------------------------------------------------------------------------


def visualize_attention(model: nn.Module, pipeline, image_paths: Sequence[str], out_dir: str,
                        batch_size: int = 8, **selection) -> List[Dict[str, Any]]:
    """Draws where the attention of ``model`` looks, for every image of ``image_paths``.

    Writes ``OUT_DIR/NAME.png`` per image and ``OUT_DIR/attention.json``: the list of
    :func:`capture_attention`'s dicts. Images run in padded batches of ``batch_size``.

    Args:
        model: A ``ddetr.DeformableDETR`` in eval mode.
        pipeline: The test pipeline (``mmcv.transforms.Compose``).
        image_paths: The images.
        out_dir: Where to write.
        batch_size: Images per forward.
        **selection: :func:`capture_attention`'s ``layer``, ``queries``, ``top_k``,
            ``pixels``, ``pixel_level``, ``score_thr``.

    Returns:
        What the JSON holds.
    """
    import mmcv
    if batch_size < 1:
        raise ValueError(f'batch_size must be at least 1, got {batch_size}')
    names = [osp.splitext(osp.basename(p))[0] for p in image_paths]
    if len(set(names)) != len(names):
        raise ValueError('images must have distinct file names (the PNGs are named after '
                         f'them): {sorted(n for n in set(names) if names.count(n) > 1)}')
    os.makedirs(out_dir, exist_ok=True)
    results = []
    for start in range(0, len(image_paths), batch_size):
        paths = image_paths[start:start + batch_size]
        items = load_images(pipeline, paths)
        for path, name, result in zip(paths, names[start:], capture_attention(
                model, items, **selection)):
            image = mmcv.imread(path, channel_order='rgb')
            result['image'] = path
            draw_attention(result, image, osp.join(out_dir, name + '.png'))
            results.append(result)
    with open(osp.join(out_dir, 'attention.json'), 'w') as f:
        json.dump(results, f)
    return results
