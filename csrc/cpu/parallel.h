// How finely the CPU kernels split element-wise work across threads.
#pragma once
#include <cstdint>

namespace semu_fast {

// Below this many elements a range runs on one thread: waking the pool costs more than it saves.
constexpr int64_t kGrain = 1 << 15;

}  // namespace semu_fast
