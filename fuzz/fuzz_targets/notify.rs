//! One `NOTIFY_SOCKET` datagram (sd_notify), as any process in a worker's
//! tree may send it. Beyond not crashing: `READY=1` is never read into a
//! datagram that does not contain it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if drover::fuzzing::notify(data) {
        assert!(data.windows(7).any(|w| w == b"READY=1"));
    }
});
