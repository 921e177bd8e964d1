#![no_main]
//! `CLUSTER SHARDS` / `CLUSTER SLOTS` replies as bytes on the wire: a snapshot or an error.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    tower_redis_cluster::fuzzing::topology_reply(bytes);
});
