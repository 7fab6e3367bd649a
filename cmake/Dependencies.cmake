# Finds titan's dependencies: LibTorch (CPU or CUDA), toml++, spdlog, PCRE2, zlib,
# nlohmann-json, GoogleTest, and on CUDA builds NCCL. System packages first; third_party/ (headers, PCRE2's
# static library and googletest sources copied from Debian's packages by third_party/fetch.sh,
# see third_party/MANIFEST) serves machines without a package manager, such as the GPU machines.

set(TITAN_DEPS_DIR "" CACHE PATH "Folder with include/, lib/ and src/googletest (third_party/ layout)")
if(NOT TITAN_DEPS_DIR)
  find_package(tomlplusplus QUIET)
  find_package(spdlog QUIET)
  find_package(nlohmann_json QUIET)
  if(NOT (tomlplusplus_FOUND AND spdlog_FOUND AND nlohmann_json_FOUND))
    if(EXISTS ${CMAKE_SOURCE_DIR}/third_party/include/toml++/toml.hpp)
      set(TITAN_DEPS_DIR ${CMAKE_SOURCE_DIR}/third_party)
      message(STATUS "titan: toml++/spdlog/nlohmann-json not installed; using third_party/")
    else()
      message(FATAL_ERROR
        "titan needs toml++, spdlog and nlohmann-json: install libtomlplusplus-dev "
        "libspdlog-dev nlohmann-json3-dev libpcre2-dev libgtest-dev, or run third_party/fetch.sh "
        "on a Debian machine and copy the filled third_party/ folder here")
    endif()
  endif()
endif()

find_package(Torch REQUIRED)
if(Torch_VERSION AND Torch_VERSION VERSION_LESS 2.4)
  message(FATAL_ERROR "titan needs LibTorch >= 2.4, found ${Torch_VERSION}")
endif()
if(TARGET torch_cuda)
  set(TITAN_CUDA ON)
else()
  set(TITAN_CUDA OFF)
endif()
message(STATUS "titan: LibTorch ${Torch_VERSION} at ${TORCH_INSTALL_PREFIX}; CUDA ${TITAN_CUDA}")

# pip wheels of LibTorch export copies of some libstdc++ symbols (std::filesystem among them)
# built with another toolchain; the first DT_NEEDED library that defines a symbol wins, so
# libstdc++ goes first and our calls never land in those copies (they crashed remove_all).
string(APPEND CMAKE_EXE_LINKER_FLAGS " -Wl,--push-state,--no-as-needed -lstdc++ -Wl,--pop-state")

add_library(titan_deps INTERFACE)
target_link_libraries(titan_deps INTERFACE ${TORCH_LIBRARIES})

if(TITAN_DEPS_DIR)
  # Header-only forms of the libraries, from the carried bundle.
  target_include_directories(titan_deps SYSTEM INTERFACE ${TITAN_DEPS_DIR}/include)
  target_compile_definitions(titan_deps INTERFACE TOML_HEADER_ONLY=1 SPDLOG_FMT_EXTERNAL
                                                  FMT_HEADER_ONLY)
else()
  find_package(tomlplusplus REQUIRED)
  find_package(spdlog REQUIRED)
  find_package(nlohmann_json REQUIRED)
  target_link_libraries(titan_deps INTERFACE tomlplusplus::tomlplusplus spdlog::spdlog
                                             nlohmann_json::nlohmann_json)
endif()

# PCRE2 (8-bit): Llama 3's pre-tokenizer regex needs its Unicode classes. The system's shared
# library where there is one (nearly every Linux has libpcre2-8.so.0), else third_party's
# static one.
find_path(PCRE2_INCLUDE_DIR pcre2.h HINTS ${TITAN_DEPS_DIR}/include)
find_library(PCRE2_LIBRARY NAMES pcre2-8 libpcre2-8.so.0)
if(NOT PCRE2_LIBRARY AND TITAN_DEPS_DIR)
  find_library(PCRE2_LIBRARY NAMES libpcre2-8.a HINTS ${TITAN_DEPS_DIR}/lib NO_DEFAULT_PATH)
endif()
if(NOT PCRE2_INCLUDE_DIR OR NOT PCRE2_LIBRARY)
  message(FATAL_ERROR "PCRE2 not found: install libpcre2-dev, or fill third_party/ (third_party/fetch.sh)")
endif()
target_include_directories(titan_deps SYSTEM INTERFACE ${PCRE2_INCLUDE_DIR})
target_compile_definitions(titan_deps INTERFACE PCRE2_CODE_UNIT_WIDTH=8)
target_link_libraries(titan_deps INTERFACE ${PCRE2_LIBRARY})

# zlib: datasets read gzip-compressed JSON lines and text (c4's .json.gz). The system's shared
# library (every Linux has libz.so.1), else third_party's static one.
find_path(ZLIB_INCLUDE_DIR zlib.h HINTS ${TITAN_DEPS_DIR}/include)
find_library(ZLIB_LIBRARY NAMES z libz.so.1)
if(NOT ZLIB_LIBRARY AND TITAN_DEPS_DIR)
  find_library(ZLIB_LIBRARY NAMES libz.a HINTS ${TITAN_DEPS_DIR}/lib NO_DEFAULT_PATH)
endif()
if(NOT ZLIB_INCLUDE_DIR OR NOT ZLIB_LIBRARY)
  message(FATAL_ERROR "zlib not found: install zlib1g-dev, or fill third_party/ (third_party/fetch.sh)")
endif()
target_include_directories(titan_deps SYSTEM INTERFACE ${ZLIB_INCLUDE_DIR})
target_link_libraries(titan_deps INTERFACE ${ZLIB_LIBRARY})

# c10d (TCPStore, ProcessGroupGloo) ships inside libtorch_cpu; Gloo headers are needed to
# use ProcessGroupGloo, and pip wheels ship none: such builds are NCCL-only.
find_path(GLOO_INCLUDE_DIR gloo/config.h)
if(GLOO_INCLUDE_DIR AND EXISTS "${TORCH_INSTALL_PREFIX}/include/torch/csrc/distributed/c10d/ProcessGroupGloo.hpp")
  set(TITAN_GLOO ON)
  target_compile_definitions(titan_deps INTERFACE TITAN_WITH_GLOO=1 USE_C10D_GLOO=1)
else()
  set(TITAN_GLOO OFF)
endif()

if(TITAN_CUDA)
  set(CMAKE_CUDA_STANDARD 17)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
  # NCCL: TITAN_NCCL_ROOT, or the nvidia-nccl wheel beside the PyTorch that provided LibTorch.
  set(TITAN_NCCL_ROOT "" CACHE PATH "NCCL install (include/, lib/)")
  find_path(NCCL_INCLUDE_DIR nccl.h HINTS ${TITAN_NCCL_ROOT}/include $ENV{NCCL_ROOT}/include)
  find_library(NCCL_LIBRARY NAMES nccl libnccl.so.2 NAMES_PER_DIR HINTS ${TITAN_NCCL_ROOT}/lib $ENV{NCCL_ROOT}/lib)
  if(NOT NCCL_INCLUDE_DIR OR NOT NCCL_LIBRARY)
    message(FATAL_ERROR "CUDA LibTorch found but NCCL not: set TITAN_NCCL_ROOT")
  endif()
  target_include_directories(titan_deps SYSTEM INTERFACE ${NCCL_INCLUDE_DIR})
  target_link_libraries(titan_deps INTERFACE ${NCCL_LIBRARY} CUDA::cudart CUDA::cublas CUDA::cublasLt)
  target_compile_definitions(titan_deps INTERFACE TITAN_WITH_CUDA=1)
endif()
message(STATUS "titan: gloo ${TITAN_GLOO}, cuda ${TITAN_CUDA}")

# GoogleTest: the system package, or its sources (Debian ships them in /usr/src/googletest).
if(TITAN_BUILD_TESTS)
  if(NOT TITAN_DEPS_DIR)
    find_package(GTest QUIET)
  endif()
  if(NOT GTest_FOUND AND EXISTS ${CMAKE_SOURCE_DIR}/third_party/src/googletest/CMakeLists.txt)
    set(TITAN_GTEST_SOURCES ${CMAKE_SOURCE_DIR}/third_party/src/googletest)
  endif()
  if(TITAN_DEPS_DIR AND EXISTS ${TITAN_DEPS_DIR}/src/googletest/CMakeLists.txt)
    set(TITAN_GTEST_SOURCES ${TITAN_DEPS_DIR}/src/googletest)
  endif()
  if(TITAN_GTEST_SOURCES)
    set(INSTALL_GTEST OFF CACHE BOOL "" FORCE)
    set(BUILD_GMOCK OFF CACHE BOOL "" FORCE)
    add_subdirectory(${TITAN_GTEST_SOURCES} ${CMAKE_BINARY_DIR}/googletest EXCLUDE_FROM_ALL)
    if(NOT TARGET GTest::gtest)
      add_library(GTest::gtest ALIAS gtest)
      add_library(GTest::gtest_main ALIAS gtest_main)
    endif()
  elseif(NOT GTest_FOUND)
    message(FATAL_ERROR "GoogleTest not found: install libgtest-dev, or fill third_party/ (third_party/fetch.sh)")
  endif()
endif()
