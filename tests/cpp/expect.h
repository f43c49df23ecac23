// The C++ tests' one check: expect(ok, what) counts the check and, on failure, the failure,
// printing the first 40 failures' descriptions. main() returns failures ? 1 : 0.
#pragma once

#include <cstdio>
#include <string>

namespace {

int failures = 0;
int checks = 0;

void expect(bool ok, const std::string& what) {
  ++checks;
  if (!ok) {
    ++failures;
    if (failures <= 40) std::printf("FAIL: %s\n", what.c_str());
  }
}

}  // namespace
