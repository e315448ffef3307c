//! The supervisor–worker control protocol: bytes a worker writes on its
//! control socket, and a worker's environment. Beyond not crashing: an
//! external command's bytes never count as "ready" (any byte asks for a
//! stop), and an environment that decodes re-encodes to the same worker.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flag, rest)) = data.split_first() else {
        return;
    };
    let split = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    let (bytes, vars) = rest.split_at(split);
    let vars = String::from_utf8_lossy(vars);
    let own = flag & 1 == 1;
    let (ready, _) = drover::fuzzing::control(bytes, own, &vars);
    if !own {
        assert!(ready.iter().all(|r| !r), "an external command's byte read as ready");
    }
});
