#![no_main]
//! Seed lists and endpoints as text: parsed or refused with an error, never a panic.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    tower_redis_cluster::fuzzing::seeds(text);
});
