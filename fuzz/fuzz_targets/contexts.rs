//! The contexts' YAML: parse, the JSON rules, the size limits and the match
//! to a worker count, exactly as `drover check`, the start and a reload run
//! them. The first byte picks `--workers` (absent, or 1..=8). Beyond not
//! crashing: whatever passes fits one environment variable (no E2BIG).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let workers = (first % 9 != 0).then_some(usize::from(first % 9));
    let text = String::from_utf8_lossy(rest);
    if let Ok(lens) = drover::fuzzing::contexts(&text, workers) {
        assert!(!lens.is_empty());
        if let Some(n) = workers {
            assert_eq!(lens.len(), n);
        }
        for len in lens {
            assert!(len <= drover::contexts::MAX_WORKER_CONTEXT_BYTES);
        }
    }
});
