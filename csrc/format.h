// Message formatting without iostreams: cat("a", 3, 0.5, sizes) -> "a30.5[2, 3]".
// Error messages are built with this rather than std::ostringstream: on one GPU image
// (torch 2.11, gcc 13) inserting an integer into an ostringstream from this extension
// crashed (see docs/design.md); std::to_string/snprintf have no such dependency.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include <cstdio>
#include <string>
#include <type_traits>

namespace amaml {
namespace fmt {

inline std::string piece(const char* s) { return s; }
inline std::string piece(const std::string& s) { return s; }
inline std::string piece(bool b) { return b ? "true" : "false"; }
inline std::string piece(c10::ScalarType t) { return c10::toString(t); }
inline std::string piece(const c10::Device& d) { return d.str(); }
inline std::string piece(c10::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}
template <typename T, typename std::enable_if<std::is_integral<T>::value && !std::is_same<T, bool>::value, int>::type = 0>
std::string piece(T v) {
  return std::to_string(v);
}
template <typename T, typename std::enable_if<std::is_floating_point<T>::value, int>::type = 0>
std::string piece(T v) {
  char buf[40];
  std::snprintf(buf, sizeof(buf), "%.10g", static_cast<double>(v));
  return buf;
}

}  // namespace fmt

template <class... Args>
std::string cat(const Args&... args) {
  std::string out;
  (void)std::initializer_list<int>{(out += fmt::piece(args), 0)...};
  return out;
}

}  // namespace amaml
