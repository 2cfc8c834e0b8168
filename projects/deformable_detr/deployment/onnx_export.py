"""torch.export and ONNX export of the end-to-end detector (:mod:`.end2end`).

:func:`export_onnx` writes :class:`~.end2end.End2EndDetector` as ONNX, with the
multi-scale deformable attention op expressed in standard ONNX, with ``GridSample``
(``'onnx'``) or with gathers and arithmetic only (``'gather'``, safe for TensorRT), or
as TensorRT's plugin node (``'custom'``) (:mod:`ops.onnx`).

The exporter is torch's dynamo exporter (``torch.onnx.export(..., dynamo=True)``, the
default since torch 2.9; the TorchScript one is deprecated): :func:`export_program`
runs ``torch.export.export`` (non-strict) on the model, where our op is a torch custom
op with a fake kernel, and the ONNX translation of the resulting ExportedProgram maps the
op through a ``custom_translation_table`` (in the ``'gather'`` mode the model is traced
with the op's gather expression instead, :func:`ops.gather_sampling`). Everything else
is torchlib's.

onnx, onnxruntime and onnxscript are needed here only (``requirements/deploy.txt``):
this module imports them when it exports.
"""
import contextlib
import functools
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import sympy
import torch
from torch import nn

from ops import gather_sampling
from ..models.detectors.deformable_detr import DeformableDETR
from .end2end import End2EndDetector, ExportError, example_inputs

OP_MODES = ('onnx', 'gather', 'custom')
#: The node type that carries the attention's sampling in each op mode's graph.
ATTENTION_NODES = dict(onnx='GridSample', gather='Gather',
                       custom='MultiscaleDeformableAttnPlugin_TRT')
INPUT_NAMES = ('input', 'img_shapes')
OUTPUT_NAMES = ('dets', 'labels')


# ----------------------------------------------------------------------------------
# torch.export
# ----------------------------------------------------------------------------------


def export_program(module: nn.Module, args: Tuple, kwargs: Optional[Dict[str, Any]] = None,
                   dynamic_shapes: Any = None) -> torch.export.ExportedProgram:
    """``torch.export.export`` (non-strict), with the failing module named on error.

    Raises:
        ExportError: the export failed; the message names the innermost submodule that
            was running (its path in ``module`` and its type) and the cause.
    """
    running: List[str] = []

    def enter(name, _mod, _args):
        running.append(name)

    def leave(_mod, _args, _out):
        running.pop()

    handles = []
    for name, mod in module.named_modules():
        handles.append(mod.register_forward_pre_hook(functools.partial(enter, name)))
        handles.append(mod.register_forward_hook(leave))
    try:
        return torch.export.export(module, args, kwargs=kwargs, dynamic_shapes=dynamic_shapes,
                                   strict=False)
    except Exception as err:
        where = running[-1] if running else ''
        piece = (f'{where} ({type(module.get_submodule(where)).__name__})' if where else
                 f'the model ({type(module).__name__})')
        raise ExportError(f'torch.export failed in {piece}: {type(err).__name__}: '
                          f'{_first_lines(str(err))}') from err
    finally:
        for handle in handles:
            handle.remove()


def _first_lines(text: str, num: int = 6) -> str:
    return '\n'.join(text.strip().splitlines()[:num])


def foreign_ops(program: torch.export.ExportedProgram) -> List[str]:
    """Custom operators of the program other than ours, each with the module calling it.

    The ONNX exporter knows aten (and prims) operators; any other namespace (mmcv's
    compiled ops, for instance) has no translation.
    """
    ours = torch.ops.ddetr.multi_scale_deformable_attn.default
    found = []
    for node in program.graph.nodes:
        target = node.target
        if node.op != 'call_function' or target is ours or not isinstance(
                target, torch._ops.OpOverload):
            continue
        if target.namespace not in ('aten', 'prims'):
            stack = node.meta.get('nn_module_stack') or {}
            path, kind = list(stack.values())[-1] if stack else ('?', '?')
            kind = getattr(kind, '__name__', str(kind)).rsplit('.', 1)[-1]
            found.append(f'{target} in {path or "the model"} ({kind})')
    return sorted(set(found))


# ----------------------------------------------------------------------------------
# ONNX
# ----------------------------------------------------------------------------------


def _ops_onnx():
    """:mod:`ops.onnx`, or an ImportError that says what to install."""
    try:
        from ops import onnx as ops_onnx
    except ImportError as err:
        raise ImportError(f'the ONNX export needs onnx, onnxscript and onnxruntime: '
                          f'pip install -r requirements/deploy.txt ({err})') from err
    return ops_onnx


def check_opset(opset: int) -> None:
    """Refuses an opset the export cannot write, naming what limits it."""
    ops_onnx = _ops_onnx()
    MIN_OPSET, MAX_OPSET = ops_onnx.MIN_OPSET, ops_onnx.MAX_OPSET  # noqa: N806
    if opset < MIN_OPSET:
        raise ValueError(
            f'ONNX opset {opset} is not supported (use {MIN_OPSET} to {MAX_OPSET}): '
            f'torch.onnx writes opset {MIN_OPSET} graphs (torchlib) and converts them lower '
            "with ONNX's version converter, which fails on this model's reductions (their "
            'axes are computed inputs); the exporter then keeps opset 18 without an error')
    if opset > MAX_OPSET:
        raise ValueError(f'ONNX opset {opset} is not supported (use {MIN_OPSET} to '
                         f'{MAX_OPSET}): onnxscript, which writes the graph, knows opsets up '
                         f'to {MAX_OPSET}')


def translation_table(op_mode: str, opset: int, plugin_version: str = '1') -> Dict:
    """The ``custom_translation_table`` that maps our op for ``op_mode``.

    Empty for ``'gather'``: there the model is traced under :func:`ops.gather_sampling`,
    and its program holds gathers and arithmetic instead of the op.
    """
    if op_mode not in OP_MODES:
        raise ValueError(f'op_mode must be one of {OP_MODES}, got {op_mode!r}')
    ops_onnx = _ops_onnx()
    if op_mode == 'gather':  # traced without the op: see export_onnx
        return {}
    fn = (ops_onnx.grid_sample_translation(opset) if op_mode == 'onnx' else
          ops_onnx.tensorrt_plugin_translation(opset, plugin_version))
    return {torch.ops.ddetr.multi_scale_deformable_attn.default: fn}


def export_onnx(detector: DeformableDETR, out: str, shape: Sequence[int], batch: int = 1,
                dynamic: bool = False, op_mode: str = 'onnx', opset: int = 18,
                plugin_version: str = '1', optimize: bool = True) -> Dict[str, Any]:
    """Writes the end-to-end detector as an ONNX file (weights inside).

    Args:
        detector: The detector, in eval mode, with its weights.
        out: The .onnx path.
        shape: (H, W) of the input to trace with (and of the graph when not dynamic).
        batch: Batch size of the static graph (a dynamic one traces with 2).
        dynamic: Batch size, height and width are dynamic (``batch``, ``height``,
            ``width``): one file serves every size in the ranges returned.
        op_mode: ``'onnx'`` (standard ONNX with ``GridSample``), ``'gather'`` (standard
            ONNX with ``Gather`` and arithmetic only: no ``GridSample``, for TensorRT) or
            ``'custom'`` (TensorRT's plugin node).
        opset: The ONNX opset.
        plugin_version: TensorRT plugin version for ``op_mode='custom'``.
        optimize: Fold constants and remove dead nodes (onnxscript's optimizer).

    Returns:
        dict of ``ranges`` (dynamic dimension -> (min, max), max None if unbounded;
        empty when static), ``attention_node`` (the node type that carries the
        attention's sampling, :data:`ATTENTION_NODES`), ``attention_nodes`` (how many
        nodes of that type the graph has: for ``'gather'`` the attention's Gathers, one
        per level and layer, and the graph's other Gathers) and ``opset``.

    Raises:
        ValueError: an unsupported opset or op mode.
        ExportError: a piece of the model that cannot be exported, named.
    """
    check_opset(opset)
    table = translation_table(op_mode, opset, plugin_version)  # checks op_mode
    program = export_end2end(detector, shape, batch, dynamic, op_mode)
    model = _translate(program, table, opset)
    import onnx
    import onnxscript
    ops_onnx = _ops_onnx()
    if optimize:
        with _default_rewrite_rules_without(SKIPPED_REWRITE_RULES):
            model = onnxscript.optimizer.optimize(model)
    ranges = _dynamic_ranges(program) if dynamic else {}
    _rename_dims(model, program, ranges)
    model.doc_string = (f'Deformable DETR end to end: {INPUT_NAMES} -> {OUTPUT_NAMES}; '
                        f'attention op mode {op_mode}; dynamic ranges {ranges or "none"}')
    ops_onnx.check_model(model)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    onnx.save(model, out)
    kind = ATTENTION_NODES[op_mode]
    return dict(ranges=ranges, attention_nodes=sum(n.op_type == kind for n in model.graph.node),
                attention_node=kind, opset=opset)


def export_end2end(detector: DeformableDETR, shape: Sequence[int], batch: int = 1,
                   dynamic: bool = False, op_mode: str = 'onnx') -> torch.export.ExportedProgram:
    """The end-to-end detector as an ExportedProgram that ONNX can translate.

    Args: as :func:`export_onnx` takes them. In the ``'gather'`` op mode the sampling is
    traced as gathers and arithmetic (:func:`ops.gather_sampling`): no op in the program.

    Raises:
        ExportError: a piece of the model that cannot be exported, or operators without
            an ONNX translation, named.
    """
    module = End2EndDetector(detector).eval()
    example = example_inputs(shape, 2 if dynamic else batch)
    dims = None
    if dynamic:
        batch_dim = torch.export.Dim('batch', min=1)
        dims = ({0: batch_dim, 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC},
                {0: batch_dim})
    sampling = gather_sampling() if op_mode == 'gather' else contextlib.nullcontext()
    with torch.no_grad(), sampling:
        program = export_program(module, example, dynamic_shapes=dims)
    foreign = foreign_ops(program)
    if foreign:
        raise ExportError('operators without an ONNX translation: ' + '; '.join(foreign))
    return program


# onnxscript rewrite rules the optimizer skips: they never apply to this model's graphs
# but take most of the optimizer's time. SlicesSplit (the Slices of one tensor as one
# Split) tries a multi-output match at every node: with onnxscript 0.7.2, 9.3 of the 13.6
# s that the optimizer spent on the demo model (dynamic, GridSample mode) and 23.3 of 29.9
# s on the R50 refine + two-stage, with no match in either op mode. Skipping a rewrite
# can change the graph's form only, never what it computes.
SKIPPED_REWRITE_RULES = ('SlicesSplit', )


@contextlib.contextmanager
def _default_rewrite_rules_without(names: Sequence[str]):
    """onnxscript's optimizer with its default rewrite rules less ``names`` (an
    onnxscript without the private rule list: its defaults, unchanged)."""
    from onnxscript import rewriter
    rules = getattr(rewriter, '_DEFAULT_REWRITE_RULES', None)
    if rules is None:
        yield
        return
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in rules
                                            if getattr(r, 'name', None) not in names)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules


def _translate(program: torch.export.ExportedProgram, table: Dict, opset: int) -> Any:
    """The program as an ONNX ModelProto, not yet optimised."""
    try:
        # optimize=False, then onnxscript's optimizer on the saved model: run inside
        # torch.onnx.export (torch 2.13, onnxscript 0.7), it leaves Clip nodes reading
        # constants it removed, an invalid graph; run on the model afterwards, it does not.
        onnx_program = torch.onnx.export(program, (), dynamo=True, custom_translation_table=table,
                                         opset_version=opset, input_names=list(INPUT_NAMES),
                                         output_names=list(OUTPUT_NAMES), optimize=False)
    except Exception as err:
        raise ExportError(f'translating the exported program to ONNX failed: '
                          f'{type(err).__name__}: {_first_lines(str(err))}') from err
    return onnx_program.model_proto


def _input_shape(program: torch.export.ExportedProgram) -> Sequence[Any]:
    """The (possibly symbolic) shape of the program's first user input, the images."""
    first = program.graph_signature.user_inputs[0]
    node = next(n for n in program.graph.nodes if n.op == 'placeholder' and n.name == first)
    return node.meta['val'].shape


def _dynamic_ranges(program: torch.export.ExportedProgram) -> Dict[str, Tuple[int, Any]]:
    """(min, max) of the batch, height and width the export holds for (max None: any)."""
    shape = _input_shape(program)
    ranges = {}
    for name, size in zip(('batch', 'height', 'width'), (shape[0], shape[2], shape[3])):
        if not isinstance(size, torch.SymInt):
            raise ExportError(f'the {name} of the input was fixed to {size} by the export, '
                              'not kept dynamic')
        bound = program.range_constraints[size.node.expr]
        upper = bound.upper
        # torch writes an unbounded size as int_oo, a sympy Number that is no Integer.
        ranges[name] = (int(bound.lower), int(upper) if isinstance(upper, sympy.Integer) else None)
    return ranges


def _rename_dims(model: Any, program: torch.export.ExportedProgram,
                 ranges: Dict[str, Tuple[int, Any]]) -> None:
    """Names the dynamic dimensions of the ONNX graph ``batch``, ``height``, ``width``."""
    if not ranges:
        return
    shape = _input_shape(program)
    rename = {str(shape[i]): name for i, name in zip((0, 2, 3), ('batch', 'height', 'width'))}
    pattern = re.compile(r'\b(' + '|'.join(map(re.escape, rename)) + r')\b')
    for info in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in info.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(lambda m: rename[m.group(1)], dim.dim_param)
