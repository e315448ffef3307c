mod common;
use common::fake_kube::FakeKube;
use common::*;
use std::time::Duration;

#[test]
fn contexts_from_a_configmap_reach_the_workers_and_follow_changes() {
    let kube = FakeKube::start("default");
    kube.put(
        "default",
        "ctx",
        &[("worker-contexts.yaml", "- {shard: 0}\n- {shard: 1}\n")],
    );
    let env = kube.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let d = start_with(bin(), &["--worker-contexts-configmap", "ctx"], &env);
    d.wait_ready();
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..200 {
        let v = get_index(d.app());
        seen.insert(v["worker"].as_u64().unwrap(), v["context"].clone());
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen[&0]["shard"], 0);
    assert_eq!(seen[&1]["shard"], 1);
    assert!(
        kube.wait_watches(1, Duration::from_secs(5)),
        "{:?}",
        kube.requests()
    );
    kube.put(
        "default",
        "ctx",
        &[("worker-contexts.yaml", "- {shard: 10}\n- {shard: 11}\n")],
    );
    assert!(
        eventually(Duration::from_secs(10), || {
            let v = get_index(d.app());
            v["context"]["shard"].as_u64().unwrap() >= 10
        }),
        "{}",
        d.log_text()
    );
    eprintln!("{:?}", kube.requests());
}
