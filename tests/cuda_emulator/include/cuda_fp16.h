// The emulator stands in for CUDA's header: its 16-bit types and everything else the kernels use.
#include "../emulator.h"
