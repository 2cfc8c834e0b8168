// Stands in for CUDA's cuda_runtime.h in the host emulation: the built-ins the kernels
// use, run on host threads (see emulation.h).
#pragma once

#include "emulation.h"
