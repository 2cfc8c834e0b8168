// Stands in for CUDA's cuda_bf16.h in the host emulation: __nv_bfloat16 as its bits, with
// conversions that round to nearest even as the device's do.
#pragma once

#include "emulation.h"
