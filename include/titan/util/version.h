// titan's version string, shared by every rank's rendezvous check and the log.
#pragma once

namespace titan {

// "0.2.0+1a2b3c4d5e": the project version and the commit the build was configured from, so
// ranks running different builds are told apart.
const char* titan_version();

}  // namespace titan
