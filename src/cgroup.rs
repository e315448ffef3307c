//! `--workers auto`: the CPUs this container may use, from the cgroup CPU
//! quota (v2 `cpu.max`, v1 `cpu.cfs_quota_us`), never more than the CPUs the
//! process may be scheduled on. Reads files only.

use std::path::Path;

/// CPUs allowed: `ceil(quota / period)`, capped by the affinity mask; at least 1.
pub fn allowed_cpus() -> usize {
    let affinity = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let quota = quota_cpus(Path::new("/"));
    quota.map_or(affinity, |q| q.min(affinity)).max(1)
}

/// The quota in whole CPUs (rounded up), if one is set, read under `root`.
pub fn quota_cpus(root: &Path) -> Option<usize> {
    // cgroup v2: the process's own cgroup, then the root of the mount (in a
    // container with a private cgroup namespace both are the same file).
    let own = std::fs::read_to_string(root.join("proc/self/cgroup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("0::"))
                .map(|p| p.trim().trim_start_matches('/').to_string())
        });
    let mut candidates = Vec::new();
    if let Some(p) = &own {
        candidates.push(root.join("sys/fs/cgroup").join(p).join("cpu.max"));
    }
    candidates.push(root.join("sys/fs/cgroup/cpu.max"));
    for c in candidates {
        if let Ok(s) = std::fs::read_to_string(&c) {
            return parse_cpu_max(&s);
        }
    }
    // cgroup v1.
    let q = std::fs::read_to_string(root.join("sys/fs/cgroup/cpu/cpu.cfs_quota_us")).ok()?;
    let p = std::fs::read_to_string(root.join("sys/fs/cgroup/cpu/cpu.cfs_period_us")).ok()?;
    let (q, p): (u64, u64) = (q.trim().parse().ok()?, p.trim().parse().ok()?);
    (q > 0 && p > 0).then(|| q.div_ceil(p) as usize)
}

/// Parses cgroup v2 `cpu.max` ("max 100000" or "150000 100000").
pub fn parse_cpu_max(s: &str) -> Option<usize> {
    let mut it = s.split_whitespace();
    let quota = it.next()?;
    let period: u64 = it.next().unwrap_or("100000").parse().ok()?;
    if quota == "max" || period == 0 {
        return None;
    }
    let quota: u64 = quota.parse().ok()?;
    Some(quota.div_ceil(period).max(1) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_max_rounds_up_and_max_means_none() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("200000 100000\n"), Some(2));
        assert_eq!(parse_cpu_max("150000 100000"), Some(2));
        assert_eq!(parse_cpu_max("50000 100000"), Some(1));
        assert_eq!(parse_cpu_max("garbage"), None);
    }

    #[test]
    fn quota_is_read_from_a_cgroup_tree() {
        let dir = std::env::temp_dir().join(format!("drover-cg-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("proc/self")).unwrap();
        std::fs::create_dir_all(dir.join("sys/fs/cgroup/kubepods/pod1")).unwrap();
        std::fs::write(dir.join("proc/self/cgroup"), "0::/kubepods/pod1\n").unwrap();
        std::fs::write(
            dir.join("sys/fs/cgroup/kubepods/pod1/cpu.max"),
            "300000 100000\n",
        )
        .unwrap();
        assert_eq!(quota_cpus(&dir), Some(3));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
