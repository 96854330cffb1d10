/*
 * Deterministic inputs shared by the examples. ffi/tests/c_programs.rs
 * regenerates the same numbers in Rust and checks that the C and C++ programs
 * compute exactly what the Rust API computes on them. Every value is one
 * integer-to-float conversion, one division and one subtraction, so C and Rust
 * round identically.
 */
#ifndef DA_EXAMPLE_INPUTS_H
#define DA_EXAMPLE_INPUTS_H

#include <stdint.h>

static inline uint32_t da_example_hash(uint32_t i, uint32_t salt) {
    uint32_t x = i * 2654435761u + salt * 40503u;
    x ^= x >> 13;
    x *= 0x5bd1e995u;
    x ^= x >> 15;
    return x;
}

/* Element i of K (salt 2) or V (salt 3): a value in [-1, 1]. */
static inline float da_example_value(uint32_t i, uint32_t salt) {
    return (float)(da_example_hash(i, salt) % 2001u) / 1000.0f - 1.0f;
}

/* Element i of a dense Q with an even head dimension: columns 2t and 2t+1 of
 * a row are nearly equal (a jitter of at most 0.05), the structure that
 * DistrAttention's column grouping exploits. */
static inline float da_example_query(uint32_t i) {
    int base = (int)(da_example_hash(i & ~1u, 1) % 2001u);
    int jitter = (int)(da_example_hash(i, 4) % 101u) - 50;
    return (float)(base + jitter) / 1000.0f - 1.0f;
}

#endif /* DA_EXAMPLE_INPUTS_H */
