mod common;
use common::*;

/// The harness itself: start, ready, one request, stop.
#[test]
fn harness_starts_serves_and_stops() {
    let mut d = start(&["--workers", "2"]);
    d.wait_ready();
    let v = get_index(d.app());
    assert!(v["pid"].as_u64().is_some());
    assert_eq!(
        http(d.admin, "POST", "/admin/stop", &[]).unwrap().status,
        202
    );
    assert_eq!(
        d.wait_exit(std::time::Duration::from_secs(10)).code(),
        Some(0)
    );
}
