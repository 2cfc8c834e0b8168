// The ddetr operators: their schema. Kernels live in cpu/ (always built) and cuda/ (built
// with CUDA), the autocast rule in autocast/, one dispatch key per file; the fake kernels
// and autograd are registered from Python (ops/multi_scale_deformable_attn.py), as
// torchvision registers its own ops.
#include <Python.h>
#include <torch/library.h>

namespace ddetr {
namespace {

TORCH_LIBRARY(ddetr, m) {
  m.def(
      "multi_scale_deformable_attn(Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  // Private: reached through autograd only.
  m.def(
      "_multi_scale_deformable_attn_backward(Tensor grad_output, Tensor value, "
      "Tensor spatial_shapes, Tensor level_start_index, Tensor sampling_locations, "
      "Tensor attention_weights) -> (Tensor, Tensor, Tensor)");
}

}  // namespace
}  // namespace ddetr

// A bare Python module: importing ops._C loads the library and runs the registrations.
// `with_cuda` says whether the CUDA kernels were compiled in.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module);
#ifdef WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (m != nullptr && PyModule_AddIntConstant(m, "with_cuda", with_cuda) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
