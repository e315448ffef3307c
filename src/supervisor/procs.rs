//! The OS side of the process table: reaping, finding the descendants a
//! worker left behind, and signals that can only reach drover's own.
//!
//! # Why every signal here reaches only drover's own processes
//! drover signals nothing but (a) its own children that it has not reaped
//! yet, and (b) the process group such a child is in *at that moment*. A pid
//! stays allocated until its parent reaps it, and a process group id stays
//! allocated while any process (a zombie included) is in the group, so
//! neither number can belong to a stranger. An exited worker is examined with
//! `waitid(WNOWAIT)` — still a zombie, its group id still its own — so what
//! it left in its group can be told to stop *before* it is reaped. drover
//! remembers no group id past that point (it once swept remembered ids at
//! exit and could kill an unrelated group that reused one). What a worker
//! leaves behind is reparented to drover (a child subreaper) and becomes a
//! child of its own, tracked in the table like any worker.

use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};

use crate::sys;

/// The next exited child, not reaped yet (still a zombie).
pub fn peek_exited() -> Option<i32> {
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    match waitid(Id::All, flags) {
        Ok(WaitStatus::Exited(pid, _)) | Ok(WaitStatus::Signaled(pid, _, _)) => Some(pid.as_raw()),
        _ => None,
    }
}

/// Direct children of this process, from /proc (each thread's `children`
/// file: an orphan is reparented to some thread of its subreaper).
pub fn children() -> Vec<i32> {
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{me}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The process group of `pid` (field 5 of /proc/PID/stat).
fn pgid_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()
}

/// Sends `sig` to `child` (a child of drover, not reaped) and to the
/// process group it is in now, if that group is not drover's own.
pub fn signal_with_group(child: i32, sig: libc::c_int) {
    if let Some(g) = pgid_of(child) {
        let own = nix::unistd::getpgrp().as_raw();
        if g > 1 && g != own {
            sys::kill_group(g, sig);
        }
    }
    sys::kill(child, sig);
}

/// Whether `pid` has a handler for `sig` (or ignores it): bit `sig` of
/// SigCgt or SigIgn in /proc/PID/status.
pub fn catches(pid: i32, sig: libc::c_int) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status.lines().any(|l| {
        (l.starts_with("SigCgt:") || l.starts_with("SigIgn:"))
            && l.split_whitespace()
                .nth(1)
                .and_then(|m| u64::from_str_radix(m, 16).ok())
                .is_some_and(|m| sig > 0 && m & (1u64 << (sig - 1)) != 0)
    })
}

/// Sends `sig` to `child` only.
pub fn signal(child: i32, sig: libc::c_int) {
    sys::kill(child, sig);
}

/// SIGKILL to every descendant: children and their groups, again as the
/// orphans of killed ones are reparented to drover, until none is left or
/// `limit` passes. Reaps them all. Returns the exits it reaped.
pub fn kill_descendants(limit: std::time::Duration) -> Vec<sys::Exited> {
    let deadline = std::time::Instant::now() + limit;
    let mut reaped = Vec::new();
    loop {
        let kids = children();
        if kids.is_empty() || std::time::Instant::now() >= deadline {
            return reaped;
        }
        for &c in &kids {
            signal_with_group(c, libc::SIGKILL);
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
        while let Some(e) = sys::reap(-1) {
            reaped.push(e);
        }
    }
}

/// Resident memory, in bytes, of every process group on the system, by
/// group id (a worker leads its own group: its id is the worker's pid, and
/// the group holds what the worker started, e.g. gunicorn's worker). One
/// walk of `/proc`; processes that vanish meanwhile are skipped.
pub fn group_rss() -> std::collections::HashMap<i32, u64> {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    let mut groups = std::collections::HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return groups;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if let Some((pgrp, pages)) = group_and_rss(pid) {
            *groups.entry(pgrp).or_insert(0) += pages * page;
        }
    }
    groups
}

/// (process group, resident pages) of `pid`, from `/proc/<pid>/stat`.
fn group_and_rss(pid: i32) -> Option<(i32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may contain spaces and ')': the
    // first is field 3 (state); pgrp is field 5, rss field 24.
    let mut f = stat.rsplit_once(')')?.1.split_ascii_whitespace();
    let pgrp = f.nth(2)?.parse().ok()?;
    let rss = f.nth(18)?.parse().ok()?;
    Some((pgrp, rss))
}
