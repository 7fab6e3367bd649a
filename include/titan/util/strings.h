// Small string helpers shared by the config, data and metrics modules.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace titan::util {

std::string lower(std::string s);
std::string trim(const std::string& s);
std::vector<std::string> split(const std::string& s, char sep);
std::string join(const std::vector<std::string>& parts, const std::string& sep);
// A TOML/JSON-style double-quoted string with escapes.
std::string quote(const std::string& s);
// Whole-string numeric parsing; false on any trailing garbage or overflow.
bool parse_int(const std::string& s, int64_t& out);
bool parse_double(const std::string& s, double& out);
// Edit distance between two strings (insert, delete, substitute, transpose).
size_t edit_distance(const std::string& a, const std::string& b);
// The candidate closest to `word`, or "" when none is reasonably close.
std::string nearest(const std::string& word, const std::vector<std::string>& candidates);
// 1234567 -> "1,234,567"
std::string with_commas(int64_t v);
// An nlohmann::json exception's text without its "[json.exception.<kind>.<id>] " tag.
std::string json_error_text(const std::string& what);
// Shortest round-tripping decimal form of a double: 500000, 0.0001, 1e-05.
std::string format_number(double v);

}  // namespace titan::util
