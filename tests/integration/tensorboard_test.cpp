// TensorBoard event files checked by an independent reader: a Python script (run in the build
// environment) parses the TFRecord framing, verifies both masked CRC-32C values of every record,
// decodes the Event / Summary protocol buffers by hand, and prints the scalars it found.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <fstream>

#include "support/test_support.h"
#include "titan/util/fs.h"

using namespace titan;

namespace {

const char* kReader = R"PY(
import json, struct, sys, os

def crc32c(data):
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF

def masked(data):
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF

def varint(buf, i):
    shift = value = 0
    while True:
        b = buf[i]; i += 1
        value |= (b & 0x7F) << shift; shift += 7
        if not b & 0x80:
            return value, i

def fields(buf):
    i = 0
    while i < len(buf):
        key, i = varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = varint(buf, i)
        elif wt == 1:
            v = buf[i:i + 8]; i += 8
        elif wt == 5:
            v = buf[i:i + 4]; i += 4
        elif wt == 2:
            n, i = varint(buf, i); v = buf[i:i + n]; i += n
        else:
            raise ValueError("wire type %d" % wt)
        yield num, wt, v

folder = sys.argv[1]
files = [f for f in os.listdir(folder) if "tfevents" in f]
assert len(files) == 1, files
data = open(os.path.join(folder, files[0]), "rb").read()
pos = records = 0
scalars = {}
version = None
while pos < len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    (hcrc,) = struct.unpack("<I", data[pos + 8:pos + 12])
    assert hcrc == masked(header), "length CRC mismatch at byte %d" % pos
    body = data[pos + 12:pos + 12 + length]
    (bcrc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
    assert bcrc == masked(body), "data CRC mismatch at byte %d" % pos
    pos += 16 + length
    records += 1
    step = 0
    for num, wt, v in fields(body):
        if num == 2:
            step = v
        elif num == 3:
            version = v.decode()
        elif num == 5:
            for n2, _, value in fields(v):
                if n2 != 1:
                    continue
                tag = None; val = None
                for n3, _, x in fields(value):
                    if n3 == 1: tag = x.decode()
                    if n3 == 2: (val,) = struct.unpack("<f", x)
                scalars.setdefault(tag, []).append([step, val])
print(json.dumps({"records": records, "version": version, "scalars": scalars}))
)PY";

}  // namespace

TEST(TensorBoard, EventFilesReadBackWithValidCrcsAndTheLoggedValues) {
  test::TempDir dir;
  const std::string out = dir.file("run");
  auto r = test::run_titan_train(
      {"--job.config_file", std::string(TITAN_SOURCE_DIR) + "/configs/debug_model.toml",
       "--training.steps", "6", "--training.seq_len", "64", "--metrics.log_freq", "2",
       "--metrics.enable_tensorboard", "--job.dump_folder", out});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  test::write_file(dir.file("reader.py"), kReader);
  auto p = test::run_process({test::python(), dir.file("reader.py"), out + "/tb"});
  ASSERT_EQ(p.exit_code, 0) << p.output;
  auto j = nlohmann::json::parse(p.output);
  EXPECT_EQ(j["version"], "brain.Event:2");
  const auto& loss = j["scalars"]["loss_metrics/global_avg_loss"];
  // Logged steps 1, 2, 4, 6: the same values as metrics.jsonl (float32 in the event file).
  auto expected = test::read_losses(out + "/metrics.jsonl");
  ASSERT_EQ(loss.size(), expected.size());
  for (size_t i = 0; i < expected.size(); ++i) {
    EXPECT_NEAR(loss[i][1].get<double>(), expected[i], 1e-6 * expected[i]) << i;
  }
  EXPECT_EQ(loss.back()[0].get<int64_t>(), 6);
  for (const char* tag :
       {"grad_norm", "lr", "throughput(tps)", "tflops", "memory/max_reserved(GiB)"}) {
    EXPECT_TRUE(j["scalars"].contains(tag)) << tag;
  }
}
