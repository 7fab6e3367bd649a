// Error check of a cuBLAS or cuBLASLt call (both return cublasStatus_t): throws with the status
// and the call's place.
#pragma once

#include <c10/util/Exception.h>
#include <cublas_v2.h>

#define TITAN_CUBLAS_CHECK(expr)                                                    \
  do {                                                                              \
    cublasStatus_t _s = (expr);                                                     \
    TORCH_CHECK(_s == CUBLAS_STATUS_SUCCESS, "cuBLAS error ", static_cast<int>(_s), \
                " at " __FILE__ ":", __LINE__);                                     \
  } while (0)
