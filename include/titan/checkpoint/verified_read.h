// Checkpoint reads verified block by block: a chunk of a tensor in a shard file, its CRC-32Cs
// from the index, and reads of element ranges that check every block they touch.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "titan/checkpoint/box.h"
#include "titan/checkpoint/safetensors.h"

namespace titan::checkpoint {

// One saved piece of a tensor, as the checkpoint index lists it.
struct Chunk {
  std::string file, key;
  Box box;                        // the part of the tensor the chunk's range is of
  int64_t offset = 0, numel = 0;  // flat range of the box
  int64_t block_bytes = kCrcBlockBytes;
  std::vector<uint32_t> crcs;  // of each block_bytes block of the key's bytes
};

// Reads elements [first, first + count) of a chunk, verifying the CRC of every block
// (c.block_bytes) it touches. With `scratch`, the bytes land in that buffer (grown when too small)
// and the result is a view of it, valid until its next use: a loader thread reusing one buffer for
// all its pieces maps and faults in its memory once, where a fresh tens-of-MiB buffer per piece is
// an mmap, a page fault per 4 KiB and an munmap each time, serialized between threads on the
// process's memory map (measured: no faster on 16 threads than on 1).
at::Tensor read_verified(const SafetensorsReader& reader, const Chunk& c, int64_t first,
                         int64_t count, at::Tensor* scratch = nullptr);

// As read_verified, into `out` (count elements of the chunk's own dtype, contiguous): the whole
// CRC blocks inside the range are read and verified where they land, so only the partial
// blocks at its two ends pass through `scratch` (one copy of the bytes fewer).
void read_verified_into(const SafetensorsReader& reader, const Chunk& c, int64_t first,
                        int64_t count, char* out, at::Tensor& scratch);

}  // namespace titan::checkpoint
