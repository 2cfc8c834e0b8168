"""Fixtures of the engine tests: the model fixtures of ``tests/test_models``.

The hooks here act on a model: they use the same small models. pytest reads a conftest
for its own folder only, so the model tests' one is loaded here by path.
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    'tests_model_fixtures',
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'test_models',
                 'conftest.py'))
_models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_models)

config_path = _models.config_path
small_model_cfg = _models.small_model_cfg
build_pair = _models.build_pair
make_batch = _models.make_batch
build_demo_model = _models.build_demo_model
