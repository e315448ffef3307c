//! `--worker-ready auto` and `notify`: systemd's readiness protocol
//! (`sd_notify(3)`) for external workers. Each worker gets `NOTIFY_SOCKET`
//! naming a datagram socket of the supervisor, a file in a private directory
//! (a read-only root filesystem needs a writable `$TMPDIR`, e.g. an
//! `emptyDir` on `/tmp`, which the chart mounts); a worker, or any process it
//! started, that sends `READY=1` marks that worker as up. gunicorn and puma
//! send it once booted. With `--worker-timeout`, a worker also gets
//! `WATCHDOG_USEC` and `WATCHDOG_PID` (sd_watchdog(3)): once it has sent
//! `WATCHDOG=1`, it must keep sending it within that interval, or it is
//! killed and replaced (`WATCHDOG=trigger` asks for that at once). The
//! sender is identified by the kernel
//! (`SCM_CREDENTIALS`), never by what it claims. This module only listens;
//! the supervisor decides.

use std::io::IoSliceMut;
use std::os::fd::AsRawFd;

use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags};
use tokio::io::Interest;
use tokio::net::UnixDatagram;
use tokio::sync::mpsc;

/// The socket and the `NOTIFY_SOCKET` value that names it.
pub struct NotifySocket {
    socket: UnixDatagram,
    /// The `NOTIFY_SOCKET` value: the socket's path.
    pub env_value: String,
}

/// The private directory of the notify socket, removed when dropped.
#[derive(Debug)]
pub struct NotifyDir(std::path::PathBuf);

impl Drop for NotifyDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl NotifySocket {
    /// Binds the supervisor's notify socket as a file in a private directory
    /// (mode 0700) under `$TMPDIR`: every sd_notify client takes a path
    /// (Ruby's and puma's take nothing else), and two drovers that are both
    /// PID 1 in one network namespace (two containers of a pod share its
    /// abstract socket names) never collide. The directory goes when the
    /// returned guard is dropped.
    pub fn bind() -> std::io::Result<(NotifySocket, NotifyDir)> {
        use std::os::unix::fs::DirBuilderExt;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!("drover-{}-{nanos:08x}", std::process::id()));
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let guard = NotifyDir(dir.clone());
        let path = dir.join("notify");
        let std = std::os::unix::net::UnixDatagram::bind(&path)?;
        setsockopt(&std, sockopt::PassCred, &true).map_err(std::io::Error::from)?;
        std.set_nonblocking(true)?;
        Ok((
            NotifySocket {
                socket: UnixDatagram::from_std(std)?,
                env_value: path.display().to_string(),
            },
            guard,
        ))
    }

    /// Sends the pid and the notice of every process that reports
    /// `READY=1` or a watchdog ping, until `tx` closes.
    pub async fn run(self, tx: mpsc::UnboundedSender<(i32, Notice)>) {
        let mut buf = [0u8; 4096];
        loop {
            if self.socket.readable().await.is_err() {
                return;
            }
            let got = self.socket.try_io(Interest::READABLE, || {
                let mut iov = [IoSliceMut::new(&mut buf)];
                let mut space = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
                let msg = recvmsg::<()>(
                    self.socket.as_raw_fd(),
                    &mut iov,
                    Some(&mut space),
                    MsgFlags::MSG_DONTWAIT,
                )
                .map_err(std::io::Error::from)?;
                let pid = msg.cmsgs().ok().and_then(|mut c| {
                    c.find_map(|m| match m {
                        ControlMessageOwned::ScmCredentials(cred) => Some(cred.pid()),
                        _ => None,
                    })
                });
                Ok((pid, msg.bytes))
            });
            let (pid, n) = match got {
                Ok(x) => x,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => continue,
            };
            if let Some(pid) = pid {
                for notice in notices(&buf[..n]) {
                    if tx.send((pid, notice)).is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// What a worker tells drover over sd_notify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// `READY=1`.
    Ready,
    /// `WATCHDOG=1`: alive.
    Watchdog,
    /// `WATCHDOG=trigger`: hung, kill me now.
    WatchdogTrigger,
}

/// Every notice in one datagram, in order (lines drover does not act on are
/// skipped). Never fails.
pub fn notices(datagram: &[u8]) -> Vec<Notice> {
    datagram
        .split(|&b| b == b'\n')
        .filter_map(|line| match line.trim_ascii() {
            b"READY=1" => Some(Notice::Ready),
            b"WATCHDOG=1" => Some(Notice::Watchdog),
            b"WATCHDOG=trigger" => Some(Notice::WatchdogTrigger),
            _ => None,
        })
        .collect()
}

/// Whether one notification datagram says `READY=1`. The datagram is
/// newline-separated `VAR=VALUE` assignments (`sd_notify(3)`), in any
/// encoding; surrounding whitespace on a line is ignored. Never fails.
pub fn says_ready(datagram: &[u8]) -> bool {
    datagram
        .split(|&b| b == b'\n')
        .any(|line| line.trim_ascii() == b"READY=1")
}

/// `pid`'s parent, from `/proc`.
pub fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_is_one_line_among_others() {
        assert!(says_ready(b"READY=1"));
        assert!(says_ready(b"STATUS=booting\nREADY=1\n"));
        assert!(says_ready(b"MAINPID=4\r\n READY=1 \r\n"));
        assert!(!says_ready(b""));
        assert!(!says_ready(b"READY=0"));
        assert!(!says_ready(b"READY=10"));
        assert!(!says_ready(b"XREADY=1"));
        assert!(!says_ready(b"STATUS=READY=1"));
        assert!(says_ready(b"\xff\xfe\nREADY=1"));
    }

    #[test]
    fn watchdog_pings_are_read() {
        assert_eq!(notices(b"WATCHDOG=1"), vec![Notice::Watchdog]);
        assert_eq!(
            notices(b"READY=1\nWATCHDOG=1\n"),
            vec![Notice::Ready, Notice::Watchdog]
        );
        assert_eq!(notices(b"WATCHDOG=trigger"), vec![Notice::WatchdogTrigger]);
        assert!(notices(b"WATCHDOG=0\nWATCHDOG_USEC=5\nSTATUS=x").is_empty());
    }
}
