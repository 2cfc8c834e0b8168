// Schema of the msda operators. Kernels: cpu/ (always) and cuda/ (when built with CUDA);
// fake kernels, autograd and autocast are registered from Python (ops/multi_scale_deform_attn.py).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(msda, m) {
  m.def(
      "forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) "
      "-> (Tensor, Tensor, Tensor)");
}

// A bare Python module: importing ops._C loads the library and runs the registrations.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
