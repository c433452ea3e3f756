// A minimal streaming JSON writer: just enough to print the example's one document without
// pulling in a JSON library. The caller is responsible for well-formed nesting; the writer
// handles commas, string escaping and number formatting.
#ifndef BERTREC_CLIENTS_CPP_JSON_WRITER_H_
#define BERTREC_CLIENTS_CPP_JSON_WRITER_H_

#include <array>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace bertrec_example {

class JsonWriter {
 public:
  // The document written so far.
  const std::string& str() const { return out_; }

  JsonWriter& BeginObject() { return Open('{'); }
  JsonWriter& EndObject() { return Close('}'); }
  JsonWriter& BeginArray() { return Open('['); }
  JsonWriter& EndArray() { return Close(']'); }

  // Writes an object key; the next value written belongs to it.
  JsonWriter& Key(std::string_view key) {
    Separate();
    AppendString(key);
    out_ += ": ";
    after_key_ = true;
    return *this;
  }

  JsonWriter& String(std::string_view value) {
    Separate();
    AppendString(value);
    return *this;
  }

  JsonWriter& Int(std::int64_t value) {
    Separate();
    std::array<char, 24> buf{};  // an int64 needs at most 20
    const auto result = std::to_chars(buf.data(), buf.data() + buf.size(), value);
    out_.append(buf.data(), result.ptr);
    return *this;
  }

  // Writes the shortest decimal that parses back to exactly this float32 (std::to_chars
  // guarantees the round trip). JSON has no NaN or infinity, so those become null.
  JsonWriter& Float(float value) { return Shortest(value); }

  // The same for a double (e.g. a rating, a proto `double` field).
  JsonWriter& Double(double value) { return Shortest(value); }

  JsonWriter& Bool(bool value) {
    Separate();
    out_ += value ? "true" : "false";
    return *this;
  }

 private:
  JsonWriter& Open(char bracket) {
    Separate();
    out_ += bracket;
    first_.push_back(true);
    return *this;
  }

  JsonWriter& Close(char bracket) {
    first_.pop_back();
    out_ += bracket;
    return *this;
  }

  template <typename T>
  JsonWriter& Shortest(T value) {
    Separate();
    if (!std::isfinite(value)) {
      out_ += "null";
      return *this;
    }
    std::array<char, 32> buf{};  // the shortest double form needs at most 24
    const auto result = std::to_chars(buf.data(), buf.data() + buf.size(), value);
    out_.append(buf.data(), result.ptr);
    return *this;
  }

  // Emits the comma between siblings (none after a key, none before the first element).
  void Separate() {
    if (after_key_) {
      after_key_ = false;
      return;
    }
    if (!first_.empty()) {
      if (!first_.back()) out_ += ", ";
      first_.back() = false;
    }
  }

  // Quotes and escapes per RFC 8259. Bytes >= 0x80 pass through unchanged: protobuf has
  // already checked that proto3 string fields are valid UTF-8.
  void AppendString(std::string_view s) {
    out_ += '"';
    for (const char c : s) {
      switch (c) {
        case '"': out_ += "\\\""; break;
        case '\\': out_ += "\\\\"; break;
        case '\b': out_ += "\\b"; break;
        case '\f': out_ += "\\f"; break;
        case '\n': out_ += "\\n"; break;
        case '\r': out_ += "\\r"; break;
        case '\t': out_ += "\\t"; break;
        default:
          if (static_cast<unsigned char>(c) < 0x20) {
            static constexpr char kHex[] = "0123456789abcdef";
            const auto byte = static_cast<unsigned char>(c);
            out_ += "\\u00";
            out_ += kHex[byte >> 4];
            out_ += kHex[byte & 0xF];
          } else {
            out_ += c;
          }
      }
    }
    out_ += '"';
  }

  std::string out_;
  std::vector<bool> first_;  // per open container: no element written yet
  bool after_key_ = false;
};

}  // namespace bertrec_example

#endif  // BERTREC_CLIENTS_CPP_JSON_WRITER_H_
