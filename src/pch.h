// Precompiled header of titan_core: the heavy, stable headers most translation units use.
#pragma once

#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>
