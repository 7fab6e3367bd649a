// titan's version string: the project version and the commit the build was configured from.
#include "titan/util/version.h"

#ifndef TITAN_PROJECT_VERSION
#define TITAN_PROJECT_VERSION "0"
#endif

namespace titan {

const char* titan_version() {
  return TITAN_PROJECT_VERSION;
}

}  // namespace titan
