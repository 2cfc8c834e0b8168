"""Deployment: the end-to-end graph (:mod:`.end2end`) and its export (:mod:`.onnx_export`).

onnx, onnxruntime and onnxscript are needed for the ONNX export only
(``requirements/deploy.txt``); they are imported when it runs.
"""
from ..checkpoint.state_dict import load_weights
from .end2end import End2EndDetector, ExportError, build_detector, example_inputs, top_detections
from .onnx_export import (INPUT_NAMES, OP_MODES, OUTPUT_NAMES, check_opset, export_onnx,
                          export_program, foreign_ops, translation_table)

__all__ = ['End2EndDetector', 'ExportError', 'build_detector', 'example_inputs',
           'top_detections', 'load_weights', 'INPUT_NAMES', 'OP_MODES', 'OUTPUT_NAMES',
           'check_opset', 'export_onnx', 'export_program', 'foreign_ops', 'translation_table']
