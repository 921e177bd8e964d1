#![no_main]
//! Commands (name and arguments split at NUL bytes): classification, block time, refusals.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    tower_redis_cluster::fuzzing::command(bytes);
});
