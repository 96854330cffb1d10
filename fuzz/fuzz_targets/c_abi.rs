//! Fuzzes the argument validation of the C ABI: every exported function on
//! fuzzed configs, descriptors, pointers and buffers (see
//! ffi/src/fuzzing.rs for what the harness generates and checks).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    distr_attention_ffi::fuzzing::run(data);
});
