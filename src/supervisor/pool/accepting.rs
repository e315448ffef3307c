//! `--worker-ready auto`: whether a worker is accepting on the shared
//! socket, seen from outside without the app's help. A process of the
//! worker's tree (the worker or a descendant: gunicorn's accepting process
//! is its master's child) accepts when
//! - the listener is registered in one of its epoll sets (asyncio, uvloop,
//!   libuv/Node, Go, tokio, nio4r): `/proc/PID/fdinfo/N` of an eventpoll fd
//!   lists each target's inode; or
//! - one of its threads is blocked in `accept`/`accept4` on it, or in
//!   `poll`/`ppoll`/`select`/`pselect6` waiting for it to be readable
//!   (Python's socketserver, gunicorn's sync worker, Ruby's `IO.select`):
//!   `/proc/PID/task/TID/syscall` gives the call and its arguments, and the
//!   poll or select set is read from `/proc/PID/mem` (drover is an ancestor,
//!   so the kernel lets it read).
//!
//! Reads only `/proc`; any read that fails just means "not seen yet".

use std::os::fd::AsFd;

const SYS_POLL: u64 = 7;
const SYS_SELECT: u64 = 23;
const SYS_ACCEPT: u64 = 43;
const SYS_PSELECT6: u64 = 270;
const SYS_PPOLL: u64 = 271;
const SYS_ACCEPT4: u64 = 288;

/// The inode of the socket behind `fd`.
pub fn inode(fd: impl AsFd) -> Option<u64> {
    nix::sys::stat::fstat(fd.as_fd()).ok().map(|st| st.st_ino)
}

/// Whether some process of the tree rooted at `root` accepts on the socket
/// with inode `ino`.
pub fn accepting(root: i32, ino: u64) -> bool {
    let mut todo = vec![root];
    let mut seen = 0;
    while let Some(pid) = todo.pop() {
        if process_accepts(pid, ino) {
            return true;
        }
        seen += 1;
        if seen > 256 {
            return false;
        }
        todo.extend(children(pid));
    }
    false
}

/// Whether some process of the tree rooted at `root` holds a descriptor of
/// the socket with inode `ino`.
pub fn holds(root: i32, ino: u64) -> bool {
    let socket = format!("socket:[{ino}]");
    let mut todo = vec![root];
    let mut seen = 0;
    while let Some(pid) = todo.pop() {
        let held = std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
            fds.flatten().any(|e| {
                std::fs::read_link(e.path()).is_ok_and(|t| t.as_os_str() == socket.as_str())
            })
        });
        if held {
            return true;
        }
        seen += 1;
        if seen > 256 {
            return false;
        }
        todo.extend(children(pid));
    }
    false
}

fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
            }
        }
    }
    out
}

fn process_accepts(pid: i32, ino: u64) -> bool {
    let socket = format!("socket:[{ino}]");
    let mut ours = Vec::new();
    let mut epolls = Vec::new();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    for e in fds.flatten() {
        let Some(fd) = e.file_name().to_str().and_then(|n| n.parse::<u64>().ok()) else {
            continue;
        };
        match std::fs::read_link(e.path()) {
            Ok(t) if t.as_os_str() == socket.as_str() => ours.push(fd),
            Ok(t) if t.as_os_str() == "anon_inode:[eventpoll]" => epolls.push(fd),
            _ => {}
        }
    }
    for ep in epolls {
        if let Ok(info) = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{ep}")) {
            if epoll_watches(&info, ino) {
                return true;
            }
        }
    }
    if ours.is_empty() {
        return false;
    }
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|t| {
        std::fs::read_to_string(t.path().join("syscall"))
            .ok()
            .and_then(|s| parse_syscall(&s))
            .is_some_and(|call| waits_on(pid, &call, &ours))
    })
}

/// Whether an eventpoll's fdinfo lists a target with inode `ino`
/// (`tfd: 7 events: 19 data: 7 pos:0 ino:1a2b sdev:8`).
fn epoll_watches(info: &str, ino: u64) -> bool {
    info.lines()
        .filter(|l| l.starts_with("tfd:"))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("ino:")))
        .any(|hex| u64::from_str_radix(hex, 16) == Ok(ino))
}

/// A blocked system call: its number and first arguments.
#[derive(Debug, PartialEq)]
struct Call {
    nr: u64,
    args: [u64; 3],
}

/// `/proc/PID/task/TID/syscall`: "NR ARG1 … ARG6 SP PC" while blocked in a
/// call; "running" or "-1 …" otherwise.
fn parse_syscall(s: &str) -> Option<Call> {
    let mut f = s.split_whitespace();
    let nr = f.next()?.parse::<u64>().ok()?;
    let mut args = [0u64; 3];
    for a in &mut args {
        *a = u64::from_str_radix(f.next()?.trim_start_matches("0x"), 16).ok()?;
    }
    Some(Call { nr, args })
}

fn waits_on(pid: i32, call: &Call, ours: &[u64]) -> bool {
    match call.nr {
        SYS_ACCEPT | SYS_ACCEPT4 => ours.contains(&call.args[0]),
        SYS_POLL | SYS_PPOLL => {
            let (ptr, n) = (call.args[0], call.args[1].min(4096));
            read_mem(pid, ptr, n as usize * 8).is_some_and(|buf| {
                buf.chunks_exact(8).any(|p| {
                    let fd = i32::from_ne_bytes([p[0], p[1], p[2], p[3]]);
                    let events = i16::from_ne_bytes([p[4], p[5]]);
                    fd >= 0 && ours.contains(&(fd as u64)) && events & libc::POLLIN != 0
                })
            })
        }
        SYS_SELECT | SYS_PSELECT6 => {
            let (n, ptr) = (call.args[0].min(65536), call.args[1]);
            if ptr == 0 {
                return false;
            }
            read_mem(pid, ptr, n.div_ceil(8) as usize).is_some_and(|set| {
                ours.iter()
                    .any(|&fd| fd < n && set[(fd / 8) as usize] & (1 << (fd % 8)) != 0)
            })
        }
        _ => false,
    }
}

fn read_mem(pid: i32, addr: u64, len: usize) -> Option<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(format!("/proc/{pid}/mem")).ok()?;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, addr).ok()?;
    Some(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoll_fdinfo_names_its_targets_by_inode() {
        let info = "pos:\t0\nflags:\t02\nmnt_id:\t15\nino:\t1057\n\
                    tfd:        7 events:       19 data:                7  pos:0 ino:2b6f9 sdev:8\n";
        assert!(epoll_watches(info, 0x2b6f9));
        assert!(!epoll_watches(info, 0x1057));
    }

    #[test]
    fn blocked_calls_parse_and_others_do_not() {
        let c = parse_syscall("288 0x3 0x0 0x0 0x80800 0x0 0x0 0x7ffd 0x7f00\n").unwrap();
        assert_eq!(
            c,
            Call {
                nr: 288,
                args: [3, 0, 0]
            }
        );
        assert!(parse_syscall("running\n").is_none());
        assert!(parse_syscall("-1 0x7ffd 0x7f00\n").is_none());
    }

    /// This very process, blocked in accept on a listener in another
    /// thread, is seen accepting; a listener nobody waits on is not.
    #[test]
    fn a_thread_blocked_in_accept_is_seen() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let idle = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ino = inode(&l).unwrap();
        let idle_ino = inode(&idle).unwrap();
        let me = std::process::id() as i32;
        assert!(!process_accepts(me, ino));
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let _ = l.accept();
        });
        let seen = (0..200).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(5));
            process_accepts(me, ino)
        });
        let _ = std::net::TcpStream::connect(addr);
        t.join().unwrap();
        assert!(seen, "a thread blocked in accept was not seen");
        assert!(!process_accepts(me, idle_ino));
    }
}
