// Stands in for CUDA's cuda_fp16.h in the host emulation: __half as its bits, with
// conversions that round to nearest even as the device's do.
#pragma once

#include "emulation.h"
