// HYBRID_CHECK(cond, parts...): TORCH_CHECK with the message built here, numbers through
// std::to_string. On the lent H200 machine (torch 2.11 wheel, extension built by the system GCC
// 13.3 against the system libstdc++), a TORCH_CHECK whose message formats an integer or a size list
// (c10::str -> std::ostream << long) killed the process with SIGSEGV instead of raising; messages
// of strings and dtype names raised normally (csrc/NOTES.md, "Session 14"). A message that is one
// std::string reaches c10 without any stream, so every check in ops.cpp goes through this.
// Arguments are evaluated only when the check fails, as with TORCH_CHECK.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <type_traits>

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

namespace hybrid {
namespace check_detail {

inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, c10::ScalarType t) { s += c10::toString(t); }
inline void append(std::string& s, const c10::Device& d) {
  s += c10::DeviceTypeName(d.type(), /*lower_case=*/true);
  if (d.has_index()) s += ":" + std::to_string(static_cast<int>(d.index()));
}
inline void append(std::string& s, c10::IntArrayRef r) {
  s += "[";
  for (size_t i = 0; i < r.size(); ++i) s += (i ? ", " : "") + std::to_string(r[i]);
  s += "]";
}
template <typename T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
inline void append(std::string& s, T v) {
  if constexpr (std::is_same_v<T, bool>) {
    s += v ? "true" : "false";
  } else if constexpr (std::is_floating_point_v<T>) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%g", static_cast<double>(v));  // as std::ostream would print it
    s += buf;
  } else {
    s += std::to_string(v);
  }
}

template <typename... A>
std::string message(const A&... parts) {
  std::string s;
  (append(s, parts), ...);
  return s;
}

}  // namespace check_detail
}  // namespace hybrid

#define HYBRID_CHECK(cond, ...) TORCH_CHECK(cond, ::hybrid::check_detail::message(__VA_ARGS__))
