// State of one grid-wide radix selection (a big group's top-r, or its random-k stage).
#ifndef GRADSIFT_SELECT_CUH
#define GRADSIFT_SELECT_CUH
#ifndef GRADSIFT_NVRTC
#include "common.cuh"
#endif

struct SelState {
    u32 hist[2048];
    u32 prefix;       // key digits of the pivot fixed so far
    u32 mask;         // which key bits `prefix` covers
    u32 prev_prefix;  // the same before the last digit
    u32 prev_mask;
    u32 need;         // elements still to take among those matching `prefix`
    u32 count;        // elements matching `prefix`
    u32 cand_mode;    // 0: no buffer, 1: the next pass fills it, 2: later passes read it
    u32 cand_len;
};

#endif  // GRADSIFT_SELECT_CUH
